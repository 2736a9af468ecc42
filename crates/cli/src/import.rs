//! `livepage import-firecracker`: Firecracker's raw guest memory file as a
//! livepage image (zero pages and holes recorded as zero, every other page
//! checksummed), so its snapshots get verification, zero runs left to the
//! kernel, chains and everything built on images.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use livepage_image::{ImageWriter, RegionDesc, kind};
use livepage_mem::MemoryKind;
use serde::Serialize;

use crate::args::parse_size;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Firecracker's memory snapshot file.
    pub mem_file: PathBuf,
    /// The image to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// The guest's page size: 4K, or 2M for a guest on hugetlbfs.
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    pub page_size: u64,
    /// JSON instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

/// What an import wrote.
#[derive(Debug, Serialize)]
pub struct Imported {
    image: String,
    id: String,
    bytes: u64,
    pages: u64,
    data_pages: u64,
    zero_pages: u64,
    seconds: f64,
}

pub fn run(args: &ImportArgs) -> anyhow::Result<ExitCode> {
    let out = import(&args.mem_file, &args.out, args.page_size)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{}: {} MiB in {} pages of {} KiB: {} data (checksummed), {} zero (holes); id {} ({:.2} s)",
            out.image,
            out.bytes >> 20,
            out.pages,
            args.page_size >> 10,
            out.data_pages,
            out.zero_pages,
            out.id,
            out.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `mem_file` as an image at `out` with pages of `ps` bytes.
pub fn import(mem_file: &Path, out: &Path, ps: u64) -> anyhow::Result<Imported> {
    let t0 = Instant::now();
    let kind = match ps {
        4096 => MemoryKind::Anon,
        0x20_0000 => MemoryKind::Hugetlb,
        _ => bail!("--page-size must be 4K or 2M, not {ps}"),
    };
    let file = File::open(mem_file)
        .with_context(|| format!("opening the memory file {}", mem_file.display()))?;
    let len = file.metadata()?.len();
    if len == 0 || len % ps != 0 {
        bail!(
            "{} has {len} bytes, not a whole number of {ps}-byte pages (is it a Firecracker \
             memory file? for a hugetlbfs guest give --page-size 2M)",
            mem_file.display()
        );
    }
    let desc = RegionDesc {
        base: 0,
        len,
        page_size: ps,
        kind: kind::of(kind),
    };
    let w = ImageWriter::create(out, &[desc], None)?;
    let bar = crate::progress::bar(len >> 20, "MiB");
    let run = (4u64 << 20).max(ps);
    let mut buf = vec![0u8; run as usize];
    let mut data_pages = 0u64;
    let mut at = 0u64;
    while at < len {
        // Holes read as zeros and stay zero pages (the image's default).
        let Some(data) = livepage_uffd::mm::seek_data(&file, at)? else {
            break;
        };
        let data = data - data % ps;
        if data >= len {
            break;
        }
        let end = livepage_uffd::mm::seek_hole(&file, data)?
            .unwrap_or(len)
            .min(len)
            .next_multiple_of(ps)
            .min(len);
        let mut off = data;
        while off < end {
            let n = (end - off).min(run) as usize;
            file.read_exact_at(&mut buf[..n], off)
                .with_context(|| format!("reading {}", mem_file.display()))?;
            for (k, page) in buf[..n].chunks(ps as usize).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    w.write_page(off / ps + k as u64, page)?;
                    data_pages += 1;
                }
            }
            off += n as u64;
            bar.set_position(off >> 20);
        }
        at = end.max(data + ps);
    }
    let id = w.finish()?;
    bar.finish_and_clear();
    Ok(Imported {
        image: out.display().to_string(),
        id: id.to_string(),
        bytes: len,
        pages: len / ps,
        data_pages,
        zero_pages: len / ps - data_pages,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
