//! Round trips, corruption named by page and offset, chains.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::*;

fn regions() -> Vec<RegionDesc> {
    vec![
        RegionDesc {
            base: 0x7000_0000,
            len: 16 * 4096,
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

fn write_sample(dir: &Path) -> (PathBuf, ImageId) {
    let path = dir.join("img");
    let w = ImageWriter::create(&path, &regions(), None).unwrap();
    for p in [0u64, 3, 15] {
        w.write_page(p, &vec![p as u8 + 1; 4096]).unwrap();
    }
    w.write_page(17, &vec![9u8; 2 << 20]).unwrap();
    w.set_vm_state(b"vcpus".to_vec());
    let id = w.finish().unwrap();
    (path, id)
}

#[test]
fn round_trip_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    let (path, id) = write_sample(dir.path());
    let img = Image::open(&path).unwrap();
    assert_eq!(img.id(), id);
    assert_eq!(img.pages(), 18);
    assert_eq!(img.counts(), (14, 4, 0));
    assert_eq!(img.vm_state(), Some(&b"vcpus"[..]));
    let mut buf = vec![0u8; 4096];
    assert_eq!(img.read_page(0, 3, &mut buf).unwrap(), PageState::Data);
    assert!(buf.iter().all(|b| *b == 4));
    assert_eq!(img.read_page(0, 4, &mut buf).unwrap(), PageState::Zero);
    assert!(buf.iter().all(|b| *b == 0));
    // The hugetlb region's data is aligned to its page size.
    assert_eq!(img.page_offset(1, 0) % (2 << 20), 0);
    assert_eq!(img.verify().unwrap(), 4);
    // Never overwritten.
    assert!(matches!(
        ImageWriter::create(&path, &regions(), None),
        Err(ImageError::Exists(_))
    ));
}

#[test]
fn corruption_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_sample(dir.path());
    let img = Image::open(&path).unwrap();
    let off = img.page_offset(0, 3) + 100;
    drop(img);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xee], off).unwrap();
    let img = Image::open(&path).unwrap();
    match img.verify() {
        Err(ImageError::PageCorrupt {
            region: 0,
            page: 3,
            offset,
            ..
        }) => assert_eq!(offset, off - 100),
        other => panic!("{other:?}"),
    }
    // Truncation and a flipped header byte are refused on open.
    let len = std::fs::metadata(&path).unwrap().len();
    f.set_len(len - 10).unwrap();
    assert!(matches!(
        Image::open(&path),
        Err(ImageError::Truncated { .. })
    ));
    f.set_len(len).unwrap();
    f.write_all_at(&[0xff], 20).unwrap();
    assert!(matches!(
        Image::open(&path),
        Err(ImageError::Corrupt { what: "header", .. })
    ));
    f.write_all_at(b"NOTANIMG", 0).unwrap();
    assert!(matches!(Image::open(&path), Err(ImageError::NotAnImage(_))));
}

#[test]
fn run_reads_equal_page_reads_across_a_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base_id) = write_sample(dir.path());
    let delta = dir.path().join("delta");
    let w = ImageWriter::create(&delta, &regions(), Some(base_id)).unwrap();
    for p in [2u64, 3, 4] {
        w.write_page(p, &vec![0x70 + p as u8; 4096]).unwrap();
    }
    w.mark_zero(15);
    w.finish().unwrap();
    let chain = Chain::open(&delta).unwrap();
    // Every run of region 0 (pages from the base, the delta and holes).
    for first in 0..16u64 {
        for n in 1..=16 - first {
            let mut run = vec![0xaau8; n as usize * 4096];
            let any = chain.read_pages(0, first, &mut run).unwrap();
            let mut page = vec![0u8; 4096];
            let mut want_any = false;
            for k in 0..n {
                chain.read_page(0, first + k, &mut page).unwrap();
                want_any |= page.iter().any(|b| *b != 0);
                assert!(run[k as usize * 4096..(k as usize + 1) * 4096] == page[..]);
            }
            assert_eq!(any, want_any, "pages {first}+{n}");
        }
    }
    let mut huge = vec![0u8; 4 << 20];
    assert!(chain.read_pages(1, 0, &mut huge).unwrap());
    assert!(huge[2 << 20..].iter().all(|b| *b == 9));
    // Runs past the region and partial pages are refused.
    assert!(chain.read_pages(0, 15, &mut [0u8; 8192]).is_err());
    assert!(chain.read_pages(0, 0, &mut [0u8; 100]).is_err());
    // A corrupt page inside a run is named.
    let off = chain.images()[0].page_offset(0, 3);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&delta)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0], off + 5).unwrap();
    let e = chain
        .read_pages(0, 2, &mut vec![0u8; 3 * 4096])
        .unwrap_err();
    assert!(matches!(e, ImageError::PageCorrupt { page: 3, .. }), "{e}");
}

#[test]
fn chains_resolve_merge_and_name_missing_parents() {
    let dir = tempfile::tempdir().unwrap();
    let (base, base_id) = write_sample(dir.path());
    let delta = dir.path().join("delta");
    let w = ImageWriter::create(&delta, &regions(), Some(base_id)).unwrap();
    w.write_page(3, &vec![0x77u8; 4096]).unwrap();
    w.mark_zero(15);
    let _ = w.finish().unwrap();
    let chain = Chain::open(&delta).unwrap();
    assert_eq!(chain.images().len(), 2);
    let mut buf = vec![0u8; 4096];
    chain.read_page(0, 3, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x77));
    chain.read_page(0, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 1), "inherited from the base");
    chain.read_page(0, 15, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0), "zeroed in the delta");
    let merged = dir.path().join("merged");
    chain.merge(&merged).unwrap();
    let m = Chain::open(&merged).unwrap();
    assert_eq!(m.images().len(), 1);
    m.read_page(0, 3, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x77));
    std::fs::remove_file(&base).unwrap();
    assert!(matches!(
        Chain::open(&delta),
        Err(ImageError::MissingParent { .. })
    ));
    // A delta naming a parent with another region layout is refused.
    let other = dir.path().join("other");
    let w = ImageWriter::create(&other, &regions()[..1], None).unwrap();
    let other_id = w.finish().unwrap();
    let bad = dir.path().join("bad");
    let w = ImageWriter::create(&bad, &regions(), Some(other_id)).unwrap();
    w.finish().unwrap();
    assert!(matches!(
        Chain::open(&bad),
        Err(ImageError::ParentMismatch { .. })
    ));
}

#[test]
fn abandoned_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let w = ImageWriter::create(&path, &regions(), None).unwrap();
    w.write_page(0, &[1u8; 4096]).unwrap();
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn any_byte_flip_outside_holes_is_detected(pos in 0u64..u64::MAX, bit in 0u8..8) {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_sample(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        let pos = pos % len;
        let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, pos).unwrap();
        f.write_all_at(&[b[0] ^ (1 << bit)], pos).unwrap();
        let img = Image::open(&path);
        let detected = match img {
            Err(_) => true,
            Ok(img) => img.verify().is_err(),
        };
        // Every byte that is read must be covered: the used header bytes, the
        // stored pages, the index and the VM state. Padding and zero pages'
        // holes are never read.
        let img = Image::open(&path);
        let f2 = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        f2.write_all_at(&b, pos).unwrap();
        let clean = Image::open(&path).unwrap();
        let used_header = pos < (REGION_TABLE_AT + clean.regions().len() * REGION_ENTRY) as u64 || (HEADER_SIZE - 4..HEADER_SIZE).contains(&pos);
        let in_data_page = (0..clean.regions().len()).any(|r| {
            (0..clean.regions()[r].pages()).any(|p| {
                let off = clean.page_offset(r, p);
                pos >= off && pos < off + clean.regions()[r].page_size
                    && clean.page_state(clean.global_page(r, p)).map(|s| s.0) == Some(PageState::Data)
            })
        });
        let in_tail = pos >= clean.layout.data_end;
        if used_header || in_data_page || in_tail {
            proptest::prop_assert!(detected, "flip at {pos} undetected ({img:?})");
        }
    }
}

/// Issue 10: a parent whose header is damaged was reported missing although
/// it was there. It is named, and said to be corrupt.
#[test]
fn issue10_a_parent_with_a_corrupt_header_is_named_corrupt_not_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (base, base_id) = write_sample(dir.path());
    let delta = dir.path().join("delta");
    let w = ImageWriter::create(&delta, &regions(), Some(base_id)).unwrap();
    w.write_page(3, &vec![0x77u8; 4096]).unwrap();
    w.finish().unwrap();
    // A flipped byte in the parent's region table (its id is intact).
    let f = OpenOptions::new().write(true).open(&base).unwrap();
    f.write_all_at(&[0xff], 130).unwrap();
    let e = Chain::open(&delta).unwrap_err();
    assert!(
        matches!(&e, ImageError::CorruptParent { path, .. } if path == &base),
        "{e}"
    );
    assert!(e.to_string().contains("corrupt"), "{e}");
    // With its id damaged too, the parent cannot be told apart, but the
    // damaged file is pointed at.
    f.write_all_at(&[0xff; 4], 30).unwrap();
    let e = Chain::open(&delta).unwrap_err();
    assert!(
        matches!(&e, ImageError::MissingParent { damaged, .. } if damaged == std::slice::from_ref(&base)),
        "{e}"
    );
    assert!(
        e.to_string().contains("corrupt header and may be it"),
        "{e}"
    );
}
