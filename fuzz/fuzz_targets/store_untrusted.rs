//! What a store hands back is untrusted: chunk objects, manifests and
//! span lists. None
//! may panic; a chunk that decodes hashes to the id it was asked for; a
//! manifest that parses is consistent and re-encodes to one that parses
//! the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livepage_store::chunk::{decode, ChunkId};
use livepage_store::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    if which % 2 == 0 {
        // As asked for by the id of its own first 32 bytes' hash, and by
        // the id its payload would have if it decoded.
        let id = ChunkId::of(rest);
        if let Ok(raw) = decode(rest, &id) {
            assert_eq!(ChunkId::of(&raw), id);
        }
        let _ = decode(rest, &ChunkId([0; 32]));
    } else if let Ok(m) = Manifest::decode(rest) {
        m.check().expect("a decoded manifest is consistent");
        assert_eq!(Manifest::decode(&m.encode()).ok(), Some(m.clone()));
        // The same bytes as its span list: refused or consistent.
        let mut with = m;
        if with.set_spans(rest).is_ok() {
            with.check_spans().expect("an accepted span list is consistent");
        }
    }
});
