//! `livepage inspect`: regions, page counts, parent, VM state.

use std::path::Path;
use std::process::ExitCode;

use livepage_image::{Image, kind};
use serde::Serialize;

use crate::table::Table;

#[derive(Serialize)]
struct Inspect<'a> {
    path: String,
    id: String,
    parent: Option<String>,
    /// A folded image: the id of the delta it replaced (its children name it).
    #[serde(skip_serializing_if = "Option::is_none")]
    stands_for: Option<String>,
    created_unix: u64,
    file_bytes: u64,
    pages: u64,
    zero_pages: u64,
    data_pages: u64,
    parent_pages: u64,
    regions: Vec<RegionOut<'a>>,
    vm_state: Option<VmOut>,
}

#[derive(Serialize)]
struct RegionOut<'a> {
    base: String,
    len: u64,
    page_size: u64,
    kind: &'a str,
    data_offset: u64,
}

#[derive(Serialize)]
struct VmOut {
    bytes: usize,
    vcpus: Option<usize>,
    ram: Option<u64>,
    workload: Option<String>,
    progress: Option<Vec<u64>>,
    error: Option<String>,
}

pub fn inspect(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let img = Image::open(path)?;
    let (zero, data, parent) = img.counts();
    let vm = img
        .vm_state()
        .map(|b| match livepage_testvm::VmState::from_bytes(b) {
            Ok(s) => VmOut {
                bytes: b.len(),
                vcpus: Some(s.vcpus.len()),
                ram: Some(s.ram),
                workload: Some(format!("{:?}", s.workload)),
                progress: Some(s.vcpus.iter().map(|v| v.progress).collect()),
                error: None,
            },
            Err(e) => VmOut {
                bytes: b.len(),
                vcpus: None,
                ram: None,
                workload: None,
                progress: None,
                error: Some(e.to_string()),
            },
        });
    let out = Inspect {
        path: path.display().to_string(),
        id: img.id().to_string(),
        parent: img.parent().map(|p| p.to_string()),
        stands_for: img.stands_for().map(|p| p.to_string()),
        created_unix: img.created(),
        file_bytes: img.file_len(),
        pages: img.pages(),
        zero_pages: zero,
        data_pages: data,
        parent_pages: parent,
        regions: img
            .regions()
            .iter()
            .enumerate()
            .map(|(i, r)| RegionOut {
                base: format!("{:#x}", r.base),
                len: r.len,
                page_size: r.page_size,
                kind: kind::name(r.kind),
                data_offset: img.page_offset(i, 0),
            })
            .collect(),
        vm_state: vm,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(["image", "value"]);
    t.row(["path".to_string(), out.path.clone()]);
    t.row(["id".to_string(), out.id.clone()]);
    t.row([
        "parent".to_string(),
        out.parent
            .clone()
            .unwrap_or_else(|| "none (full image)".into()),
    ]);
    if let Some(s) = &out.stands_for {
        t.row([
            "stands for".to_string(),
            format!(
                "{s} (a delta folded into its parent; that delta's children find it by this id)"
            ),
        ]);
    }
    t.row([
        "file size".to_string(),
        format!("{} bytes (sparse: zero pages are holes)", out.file_bytes),
    ]);
    t.row([
        "pages".to_string(),
        format!(
            "{} total: {} data, {} zero, {} in parent",
            out.pages, data, zero, parent
        ),
    ]);
    if let Some(v) = &out.vm_state {
        t.row([
            "VM state".to_string(),
            match &v.error {
                Some(e) => format!("{} bytes, unreadable: {e}", v.bytes),
                None => format!(
                    "{} vCPUs, {} MiB RAM, {}, progress {:?}",
                    v.vcpus.unwrap_or(0),
                    v.ram.unwrap_or(0) >> 20,
                    v.workload.clone().unwrap_or_default(),
                    v.progress.clone().unwrap_or_default()
                ),
            },
        ]);
    }
    print!("{}", t.render());
    let mut t = Table::new([
        "region",
        "base",
        "bytes",
        "page size",
        "memory",
        "data offset",
    ]);
    for (i, r) in out.regions.iter().enumerate() {
        t.row([
            i.to_string(),
            r.base.clone(),
            r.len.to_string(),
            r.page_size.to_string(),
            r.kind.to_string(),
            format!("{:#x}", r.data_offset),
        ]);
    }
    print!("\n{}", t.render());
    Ok(ExitCode::SUCCESS)
}
