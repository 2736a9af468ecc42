//! `livepage prune`: keep the last N checkpoints of a chain, folding the
//! older deltas into their parents (also what `vm run --keep` does in the
//! background, and how a chain is tidied after a run was killed mid-fold).

use std::num::NonZeroUsize;
use std::path::Path;
use std::process::ExitCode;

use crate::table::Table;

pub fn prune(head: &Path, keep: NonZeroUsize, json: bool) -> anyhow::Result<ExitCode> {
    let bar = crate::progress::bar(0, "folding");
    let rep = livepage_image::retain(head, keep, &mut |image, p| {
        bar.set_length(p.total >> 20);
        bar.set_position(p.done >> 20);
        bar.set_message(
            image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    })?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rep.folds.is_empty() {
        println!("{}: nothing to fold", head.display());
    } else {
        let mut t = Table::new([
            "folded into",
            "removed",
            "from parent",
            "from delta",
            "MiB",
            "ms",
        ]);
        for f in &rep.folds {
            t.row([
                f.image.display().to_string(),
                f.base.display().to_string(),
                f.base_pages.to_string(),
                f.delta_pages.to_string(),
                format!("{:.1}", f.bytes as f64 / (1 << 20) as f64),
                format!("{:.1}", f.duration_ms),
            ]);
        }
        print!("{}", t.render());
    }
    for s in &rep.swept {
        println!(
            "removed {} (left by an interrupted fold or write)",
            s.display()
        );
    }
    for s in &rep.strays {
        println!(
            "{} is the parent of an interrupted fold: the chain no longer needs it (delete it unless it is a copy you keep)",
            s.display()
        );
    }
    println!("kept, newest first:");
    for k in &rep.kept {
        println!("  {}", k.display());
    }
    Ok(ExitCode::SUCCESS)
}
