//! Push, pull, lazy reads and gc against a local directory store: no
//! kernel feature and no server needed.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use livepage_image::{Chain, ImageId, ImageWriter, RegionDesc};
use livepage_restore::{Lane, PageSource};
use livepage_store::{
    ChunkId, PushOptions, Store, StoreError, StoreImage, StoreOptions, StoreSource, StoreUrl, gc,
    pull, push,
};

const PAGES: u64 = 600; // 4 full 128-page spans and a short one

fn region() -> RegionDesc {
    RegionDesc {
        base: 0x7000_0000,
        len: PAGES * 4096,
        page_size: 4096,
        kind: livepage_image::kind::SHMEM,
    }
}

fn page(p: u64, generation: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (p.wrapping_mul(31) ^ generation.wrapping_mul(7) ^ (i as u64 / 64)) as u8 | 1;
    }
    v
}

/// A full image (pages 0..300 data, the rest zero) and `deltas` deltas,
/// delta k rewriting pages k*10..k*10+5. Returns the paths, oldest first.
fn chain(dir: &Path, deltas: u64) -> Vec<PathBuf> {
    let mut paths = vec![dir.join("ck-0")];
    let w = ImageWriter::create(&paths[0], &[region()], None).unwrap();
    for p in 0..300 {
        w.write_page(p, &page(p, 0)).unwrap();
    }
    w.set_vm_state(b"vcpu state 0".to_vec());
    let mut parent: ImageId = w.finish().unwrap();
    for k in 1..=deltas {
        let path = dir.join(format!("ck-{k}"));
        let w = ImageWriter::create(&path, &[region()], Some(parent)).unwrap();
        for p in k * 10..k * 10 + 5 {
            w.write_page(p, &page(p, k)).unwrap();
        }
        w.set_vm_state(format!("vcpu state {k}").into_bytes());
        parent = w.finish().unwrap();
        paths.push(path);
    }
    paths
}

fn open(url: &str, create: bool) -> Arc<Store> {
    Arc::new(
        Store::open(
            &StoreUrl::parse(url).unwrap(),
            StoreOptions {
                create,
                ..StoreOptions::default()
            },
        )
        .unwrap(),
    )
}

fn all_pages_of(src: &dyn PageSource) -> Vec<u8> {
    let mut buf = vec![0u8; (PAGES * 4096) as usize];
    // Odd-sized reads that straddle chunk boundaries.
    let mut p = 0;
    while p < PAGES {
        let n = (37).min(PAGES - p);
        src.read_pages(
            0,
            p,
            &mut buf[(p * 4096) as usize..((p + n) * 4096) as usize],
            Lane::Demand,
        )
        .unwrap();
        p += n;
    }
    buf
}

#[test]
fn a_chain_pushes_once_per_distinct_chunk_and_reads_back_page_for_page() {
    let d = tempfile::tempdir().unwrap();
    let paths = chain(d.path(), 4);
    let url = format!("dir://{}/store", d.path().display());
    let store = open(&url, true);
    let r = push(&paths[4], &store, &PushOptions::default(), &|_, _| {}).unwrap();
    assert_eq!(r.images.len(), 5);
    // Base: spans 0-1 data, span 2 half data (pages 256..300), 3-4 zero.
    assert_eq!(r.images[0].chunks_new, 3 + 1 + 1); // + VM state, span list
    assert_eq!(r.images[0].chunks_zero, 2);
    // Each delta changes span 0 only (pages < 50): one new chunk, its VM
    // state and span list; spans 1-2 are the parent's, 3-4 zero.
    for k in 1..5 {
        assert_eq!(r.images[k].chunks_new, 3, "{:?}", r.images[k]);
        assert_eq!(r.images[k].chunks_shared, 2);
    }
    let objects = store.list("chunks").unwrap();
    assert_eq!(objects.len() as u64, r.chunks_new);
    // Stored bytes are the distinct chunks (compressed) and the manifests.
    let stored: u64 = objects.iter().map(|o| o.size).sum();
    assert!(stored < 9 * 512 * 1024, "{stored}");

    // Every checkpoint reads back as its chain does, lazily and pulled.
    for (k, p) in paths.iter().enumerate() {
        let want_chain = Chain::open(p).unwrap();
        let mut want = vec![0u8; (PAGES * 4096) as usize];
        want_chain.read_pages(0, 0, &mut want).unwrap();
        let name = format!("ck-{k}");
        let img = StoreImage::open(store.clone(), &name).unwrap();
        assert_eq!(
            img.vm_state().unwrap().unwrap(),
            format!("vcpu state {k}").into_bytes()
        );
        let src = StoreSource::new(img.clone(), None);
        assert!(all_pages_of(&src) == want, "lazy read of {name}");
        // From the manifest alone (the span list fetched by the source).
        let bare = StoreImage::open_manifest(store.clone(), &name).unwrap();
        assert!(!bare.manifest().has_spans());
        assert!(
            bare.read_span(0, 0).is_err(),
            "no silent zeros without the span list"
        );
        let lazy = StoreSource::new(bare, None);
        assert!(
            all_pages_of(&lazy) == want,
            "lazy read of {name} from its manifest"
        );
        assert_eq!(src.zero_runs(0), Some(vec![(384, 600)]));
        let out = d.path().join(format!("pulled-{k}"));
        pull(&img, &out, 3, &|_, _| {}).unwrap();
        let got = Chain::open(&out).unwrap();
        let mut back = vec![0u8; (PAGES * 4096) as usize];
        got.read_pages(0, 0, &mut back).unwrap();
        assert!(back == want, "pulled {name}");
        assert_eq!(
            got.head().vm_state().unwrap(),
            format!("vcpu state {k}").as_bytes()
        );
    }

    // Pushing again sends nothing; a different image under a taken name is refused.
    let again = push(&paths[4], &store, &PushOptions::default(), &|_, _| {}).unwrap();
    assert!(again.images.iter().all(|i| i.already_there));
    let other = tempfile::tempdir().unwrap();
    let o = chain(other.path(), 0);
    let e = push(
        &o[0],
        &store,
        &PushOptions {
            name: Some("ck-2".into()),
            ..Default::default()
        },
        &|_, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, StoreError::NameTaken { .. }), "{e}");
}

#[test]
fn clones_share_chunks_and_gc_keeps_what_manifests_name() {
    let d = tempfile::tempdir().unwrap();
    let paths = chain(d.path(), 0);
    let url = format!("dir://{}/store", d.path().display());
    let store = open(&url, true);
    let first = push(
        &paths[0],
        &store,
        &PushOptions {
            name: Some("clone-0".into()),
            ..Default::default()
        },
        &|_, _| {},
    )
    .unwrap();
    for i in 1..10 {
        let r = push(
            &paths[0],
            &store,
            &PushOptions {
                name: Some(format!("clone-{i}")),
                ..Default::default()
            },
            &|_, _| {},
        )
        .unwrap();
        assert_eq!(r.chunks_new, 0);
    }
    assert_eq!(store.list("chunks").unwrap().len() as u64, first.chunks_new);
    assert_eq!(store.list("images").unwrap().len(), 10);

    // Nothing unnamed: gc deletes nothing.
    let g = gc(&store, std::time::Duration::ZERO, false).unwrap();
    assert_eq!((g.deleted, g.referenced), (0, first.chunks_new));
    // With every manifest gone, young chunks stay, old ones go.
    for i in 0..10 {
        store.delete(&format!("images/clone-{i}")).unwrap();
    }
    let g = gc(&store, std::time::Duration::from_secs(3600), false).unwrap();
    assert_eq!((g.deleted, g.young_kept), (0, first.chunks_new));
    let g = gc(&store, std::time::Duration::ZERO, true).unwrap();
    assert_eq!(g.deleted, first.chunks_new);
    assert_eq!(store.list("chunks").unwrap().len() as u64, first.chunks_new);
    gc(&store, std::time::Duration::ZERO, false).unwrap();
    assert!(store.list("chunks").unwrap().is_empty());
}

#[test]
fn a_corrupt_or_missing_chunk_names_the_image_region_and_pages() {
    let d = tempfile::tempdir().unwrap();
    let paths = chain(d.path(), 1);
    let root = d.path().join("store");
    let url = format!("dir://{}", root.display());
    let store = open(&url, true);
    push(&paths[1], &store, &PushOptions::default(), &|_, _| {}).unwrap();
    let img = StoreImage::open(store.clone(), "ck-1").unwrap();
    let id = img.manifest().regions[0].chunk(1).unwrap();
    let file = root.join(id.key());
    let mut obj = std::fs::read(&file).unwrap();
    let n = obj.len();
    obj[n / 2] ^= 0x40;
    std::fs::write(&file, &obj).unwrap();
    let src = StoreSource::new(img.clone(), None);
    let mut buf = vec![0u8; 4096];
    let e = src.read_pages(0, 130, &mut buf, Lane::Demand).unwrap_err();
    let msg = e.to_string();
    assert!(!e.is_fatal(), "{msg}");
    assert!(
        msg.contains(&id.to_string()) && msg.contains("ck-1") && msg.contains("pages 128..256"),
        "{msg}"
    );
    let e = pull(&img, &d.path().join("out"), 2, &|_, _| {}).unwrap_err();
    assert!(e.to_string().contains(&id.to_string()), "{e}");
    assert!(
        !d.path().join("out").exists(),
        "a failed pull leaves no file"
    );
    std::fs::remove_file(&file).unwrap();
    let e = src
        .read_pages(0, 200, &mut buf, Lane::Demand)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing") && e.contains(&id.to_string()), "{e}");
    // Pages of other chunks still read.
    assert!(src.read_pages(0, 3, &mut buf, Lane::Demand).unwrap());
    let _ = ChunkId::of(b"");
}

#[test]
fn missing_stores_and_images_say_what_to_do() {
    let d = tempfile::tempdir().unwrap();
    let url = format!("dir://{}/none", d.path().display());
    let e = Store::open(&StoreUrl::parse(&url).unwrap(), StoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("livepage push"), "{e}");
    let store = open(&url, true);
    let e = StoreImage::open(store, "nope").unwrap_err().to_string();
    assert!(e.contains("livepage ls"), "{e}");
}
