//! Folds and retention: every kept checkpoint reads as it did before, with
//! nothing left behind, whatever the chain.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;

fn regions() -> Vec<RegionDesc> {
    vec![
        RegionDesc {
            base: 0x7000_0000,
            len: 24 * 4096,
            page_size: 4096,
            kind: kind::ANON,
        },
        RegionDesc {
            base: 0x9000_0000,
            len: 4 << 20,
            page_size: 2 << 20,
            kind: kind::HUGETLB,
        },
    ]
}

const PAGES: u64 = 26;

fn page_len(g: u64) -> usize {
    if g < 24 { 4096 } else { 2 << 20 }
}

/// Writes a chain: image `i` applies `changes[i]` (page, fill byte; 0 is a
/// zero page) to image `i - 1`. Returns each image's path and the memory
/// it stands for (one fill byte per page).
fn write_chain(dir: &Path, changes: &[Vec<(u64, u8)>]) -> Vec<(PathBuf, Vec<u8>)> {
    let mut mem = vec![0u8; PAGES as usize];
    let mut parent = None;
    let mut out = Vec::new();
    for (i, ch) in changes.iter().enumerate() {
        let path = dir.join(format!("checkpoint-{i:04}.img"));
        let w = ImageWriter::create(&path, &regions(), parent).unwrap();
        for &(g, v) in ch {
            mem[g as usize] = v;
        }
        let touched: Vec<u64> = if parent.is_none() {
            (0..PAGES).collect()
        } else {
            ch.iter().map(|c| c.0).collect()
        };
        for g in touched {
            match mem[g as usize] {
                0 => w.mark_zero(g),
                v => w.write_page(g, &vec![v; page_len(g)]).unwrap(),
            }
        }
        w.set_vm_state(format!("state {i}").into_bytes());
        parent = Some(w.finish().unwrap());
        out.push((path, mem.clone()));
    }
    out
}

fn check(path: &Path, want: &[u8], i: usize) {
    let chain = Chain::open(path).unwrap();
    chain.verify().unwrap();
    assert_eq!(
        chain.head().vm_state(),
        Some(format!("state {i}").as_bytes())
    );
    for g in 0..PAGES {
        let (r, p) = if g < 24 { (0, g) } else { (1, g - 24) };
        let mut buf = vec![1u8; page_len(g)];
        chain.read_page(r, p, &mut buf).unwrap();
        assert!(
            buf.iter().all(|b| *b == want[g as usize]),
            "{}: page {g} is not {}",
            path.display(),
            want[g as usize]
        );
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn changes() -> impl Strategy<Value = Vec<Vec<(u64, u8)>>> {
    proptest::collection::vec(proptest::collection::vec((0..PAGES, 0u8..4), 0..12), 1..9)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Retaining any chain keeps its newest `keep` checkpoints, each
    /// reading as before, and nothing else.
    #[test]
    fn retention_keeps_the_newest_checkpoints_intact(ch in changes(), keep in 1usize..4) {
        let dir = tempfile::tempdir().unwrap();
        let chain = write_chain(dir.path(), &ch);
        let head = &chain.last().unwrap().0;
        let rep = retain(head, NonZeroUsize::new(keep).unwrap(), &mut |_, _| {}).unwrap();
        let n = chain.len();
        let kept = keep.min(n);
        prop_assert_eq!(rep.folds.len(), n - kept);
        prop_assert_eq!(rep.kept.len(), kept);
        let want: Vec<String> = chain[n - kept..]
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        prop_assert_eq!(names(dir.path()), want);
        for (i, (path, mem)) in chain.iter().enumerate().skip(n - kept) {
            check(path, mem, i);
        }
    }
}

#[test]
fn a_folded_image_stands_for_the_delta_and_keeps_its_instant() {
    let dir = tempfile::tempdir().unwrap();
    let ch = vec![vec![(0, 1), (25, 2)], vec![(0, 0), (3, 3)], vec![(4, 4)]];
    let chain = write_chain(dir.path(), &ch);
    let delta = Image::open(&chain[1].0).unwrap();
    let mut seen = Vec::new();
    let rep = fold(&chain[0].0, &chain[1].0, &mut |p| seen.push(p)).unwrap();
    assert!(!chain[0].0.exists(), "the parent is removed");
    let folded = Image::open(&chain[1].0).unwrap();
    assert_eq!(folded.parent(), None);
    assert_eq!(folded.stands_for(), Some(delta.id()));
    assert_eq!(rep.stands_for, delta.id());
    assert_eq!(folded.created(), delta.created());
    assert_eq!((rep.base_pages, rep.delta_pages), (1, 1));
    assert_eq!(
        seen.last().map(|p| (p.done, p.total)),
        Some((rep.bytes, rep.bytes))
    );
    assert_eq!(rep.bytes, (2 << 20) + 4096);
    // The grandchild finds it by the delta's id.
    check(&chain[2].0, &chain[2].1, 2);
    check(&chain[1].0, &chain[1].1, 1);
    // And folds further: a folded image is a full image.
    fold(&chain[1].0, &chain[2].0, &mut |_| {}).unwrap();
    check(&chain[2].0, &chain[2].1, 2);
    assert_eq!(names(dir.path()), vec!["checkpoint-0002.img"]);
}

#[test]
fn refusals_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let chain = write_chain(dir.path(), &[vec![(1, 1)], vec![(2, 2)], vec![(3, 3)]]);
    let e = fold(&chain[1].0, &chain[2].0, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("itself a delta"), "{e}");
    let e = fold(&chain[0].0, &chain[2].0, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("not a delta of this parent"), "{e}");
    let e = fold(&chain[0].0, &chain[0].0, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("full image already"), "{e}");
    // Nothing changed.
    for (i, (p, m)) in chain.iter().enumerate() {
        check(p, m, i);
    }
}

/// What a fold killed at any point can leave: the staged `.NAME.fold`
/// beside the whole chain, or the folded image with its parent not yet
/// removed. Every checkpoint stays readable; retention sweeps the rest.
#[test]
fn interrupted_folds_leave_the_chain_whole() {
    let dir = tempfile::tempdir().unwrap();
    let ch = vec![vec![(0, 1)], vec![(1, 2)], vec![(2, 3)], vec![(3, 4)]];
    let chain = write_chain(dir.path(), &ch);
    // Killed after the rename, before the parent's removal.
    let kept_parent = dir.path().join("old-parent.img");
    std::fs::copy(&chain[0].0, &kept_parent).unwrap();
    fold(&chain[0].0, &chain[1].0, &mut |_| {}).unwrap();
    std::fs::rename(&kept_parent, &chain[0].0).unwrap();
    for (i, (p, m)) in chain.iter().enumerate() {
        check(p, m, i);
    }
    // Then killed between the link and the rename of the next fold: its
    // image staged beside the whole chain.
    let staged = dir.path().join(".checkpoint-0002.img.fold");
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    for (p, _) in &chain[1..3] {
        std::fs::copy(p, scratch.join(p.file_name().unwrap())).unwrap();
    }
    let (b, c) = (
        scratch.join("checkpoint-0001.img"),
        scratch.join("checkpoint-0002.img"),
    );
    fold(&b, &c, &mut |_| {}).unwrap();
    std::fs::rename(&c, &staged).unwrap();
    std::fs::remove_dir_all(&scratch).unwrap();
    for (i, (p, m)) in chain.iter().enumerate() {
        check(p, m, i);
    }
    let rep = retain(&chain[3].0, NonZeroUsize::new(2).unwrap(), &mut |_, _| {}).unwrap();
    assert_eq!(rep.swept, vec![staged]);
    assert_eq!(
        rep.strays,
        vec![chain[0].0.clone()],
        "the parent left is named"
    );
    assert_eq!(
        names(dir.path()),
        vec![
            "checkpoint-0000.img",
            "checkpoint-0002.img",
            "checkpoint-0003.img"
        ],
        "a stray is reported, never deleted (a copy kept on purpose looks the same)"
    );
    for (i, (p, m)) in chain.iter().enumerate().skip(2) {
        check(p, m, i);
    }
}

/// An image never becomes visible under its name before it is complete: an
/// abandoned writer leaves no file, named or not.
#[test]
fn an_abandoned_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let w = ImageWriter::create(&path, &regions(), None).unwrap();
    w.write_page(0, &vec![1u8; 4096]).unwrap();
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    drop(w);
    assert!(names(dir.path()).is_empty());
}
