//! `livepage merge`: a chain compacted into one full image.

use std::path::Path;
use std::process::ExitCode;

use livepage_image::Chain;

pub fn merge(path: &Path, out: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let chain = Chain::open(path)?;
    let id = chain.merge(out)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"merged": chain.images().len(), "out": out.display().to_string(), "id": id.to_string()})
        );
    } else {
        println!(
            "{}: {} image(s) merged into one full image (id {id})",
            out.display(),
            chain.images().len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
