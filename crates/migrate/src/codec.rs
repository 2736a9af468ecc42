//! Compression of page chunks: lz4 (block) and zstd, per chunk, with an
//! `auto` policy that compresses only where it pays: it compares the link's
//! measured bandwidth with each codec's measured speed and ratio on this
//! very data. Chunks that do not shrink go raw. Kernel-free.

use std::sync::Mutex;
use std::time::Duration;

use crate::proto::frame::pages;

/// What `--compress` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Decide from measured bandwidth and compression speed.
    #[default]
    Auto,
    /// Never compress.
    None,
    /// Always lz4 (fast, modest ratio).
    Lz4,
    /// Always zstd (slower, better ratio).
    Zstd,
}

/// A codec a chunk was sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Raw.
    None,
    /// lz4 block.
    Lz4,
    /// zstd, level 1.
    Zstd,
}

impl Codec {
    /// The codec bits of a pages frame's flags.
    pub fn flags(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => pages::LZ4,
            Codec::Zstd => pages::ZSTD,
        }
    }

    /// The codec named by a pages frame's flags.
    pub fn of_flags(flags: u8) -> Codec {
        match flags & pages::CODEC {
            pages::LZ4 => Codec::Lz4,
            pages::ZSTD => Codec::Zstd,
            _ => Codec::None,
        }
    }
}

/// Why a chunk could not be decompressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The payload is not valid for its codec, or does not expand to the
    /// pages the frame describes.
    #[error("a {codec:?} chunk does not decompress to its {want} bytes")]
    Corrupt {
        /// The codec.
        codec: Codec,
        /// Bytes the frame describes.
        want: usize,
    },
    /// A raw payload of the wrong size.
    #[error("a raw chunk of {have} bytes where {want} are described")]
    Size {
        /// Bytes there.
        have: usize,
        /// Bytes described.
        want: usize,
    },
}

/// A sender thread's compressors (kept: zstd contexts are costly to make).
pub struct Compressor {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    out: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor").finish_non_exhaustive()
    }
}

impl Default for Compressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Compressor {
    /// New compressors.
    pub fn new() -> Compressor {
        Compressor {
            zstd: zstd::bulk::Compressor::new(1).ok(),
            out: Vec::new(),
        }
    }

    /// Compresses `raw` with `codec`. Returns the codec used and the payload:
    /// `raw` itself when the codec is none, failed, or saved under 1/8.
    pub fn compress<'a>(&'a mut self, codec: Codec, raw: &'a [u8]) -> (Codec, &'a [u8]) {
        let n = match codec {
            Codec::None => return (Codec::None, raw),
            Codec::Lz4 => {
                self.out
                    .resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
                lz4_flex::block::compress_into(raw, &mut self.out).ok()
            }
            Codec::Zstd => {
                self.out
                    .resize(zstd::zstd_safe::compress_bound(raw.len()), 0);
                self.zstd
                    .as_mut()
                    .and_then(|z| z.compress_to_buffer(raw, &mut self.out[..]).ok())
            }
        };
        match n {
            Some(n) if n < raw.len() - raw.len() / 8 => (codec, &self.out[..n]),
            _ => (Codec::None, raw),
        }
    }
}

/// Decompresses `payload` (sent with `codec`) into `out`, which must be
/// filled exactly.
pub fn decompress(codec: Codec, payload: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    let want = out.len();
    let corrupt = CodecError::Corrupt { codec, want };
    match codec {
        Codec::None => {
            if payload.len() != want {
                return Err(CodecError::Size {
                    have: payload.len(),
                    want,
                });
            }
            out.copy_from_slice(payload);
        }
        Codec::Lz4 => {
            let n = lz4_flex::block::decompress_into(payload, out).map_err(|_| corrupt.clone())?;
            if n != want {
                return Err(corrupt);
            }
        }
        Codec::Zstd => {
            // The frame must say how large it is, and say exactly this.
            match zstd::zstd_safe::get_frame_content_size(payload) {
                Ok(Some(n)) if n == want as u64 => {}
                _ => return Err(corrupt),
            }
            let n = zstd::zstd_safe::decompress(out, payload).map_err(|_| corrupt.clone())?;
            if n != want {
                return Err(corrupt);
            }
        }
    }
    Ok(())
}

/// Running estimates of one codec on this migration's data.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    /// Input bytes per second of one thread.
    speed: f64,
    /// Output ÷ input.
    ratio: f64,
}

#[derive(Debug)]
struct AutoState {
    link: Option<f64>,
    lz4: Estimate,
    zstd: Estimate,
    chunks: u64,
}

/// The `auto` policy: per chunk, the codec with the shortest expected time
/// per input byte, `max(1 / (speed × threads), ratio / bandwidth)` (the
/// compressing threads and the link work in a pipeline), against raw's
/// `1 / bandwidth`. Every 32nd chunk is also tried with the codecs not
/// chosen, so their estimates follow the data.
#[derive(Debug)]
pub struct AutoPolicy {
    fixed: Compression,
    threads: f64,
    state: Mutex<AutoState>,
}

impl AutoPolicy {
    /// A policy for `threads` compressing threads.
    pub fn new(choice: Compression, threads: usize) -> AutoPolicy {
        AutoPolicy {
            fixed: choice,
            threads: threads.max(1) as f64,
            state: Mutex::new(AutoState {
                link: None,
                // Typical single-core figures on page data; replaced by
                // measurements within the first chunks.
                lz4: Estimate {
                    speed: 600e6,
                    ratio: 0.5,
                },
                zstd: Estimate {
                    speed: 250e6,
                    ratio: 0.35,
                },
                chunks: 0,
            }),
        }
    }

    /// Records that `bytes` went over the link in `took` (a sender's own
    /// time blocked in writes excluded nothing: wall time while busy).
    pub fn observe_link(&self, bytes: u64, took: Duration) {
        if bytes < 64 << 10 || took.is_zero() {
            return;
        }
        let bw = bytes as f64 / took.as_secs_f64();
        if let Ok(mut s) = self.state.lock() {
            s.link = Some(match s.link {
                Some(old) => old * 0.7 + bw * 0.3,
                None => bw,
            });
        }
    }

    /// The link bandwidth estimate (bytes per second), once measured.
    pub fn link(&self) -> Option<f64> {
        self.state.lock().ok().and_then(|s| s.link)
    }

    /// Records a compression of `input` bytes into `output` in `took`.
    pub fn observe(&self, codec: Codec, input: usize, output: usize, took: Duration) {
        if input == 0 || codec == Codec::None {
            return;
        }
        let speed = input as f64 / took.as_secs_f64().max(1e-7);
        let ratio = (output as f64 / input as f64).min(1.0);
        if let Ok(mut s) = self.state.lock() {
            let e = match codec {
                Codec::Lz4 => &mut s.lz4,
                _ => &mut s.zstd,
            };
            e.speed = e.speed * 0.8 + speed * 0.2;
            e.ratio = e.ratio * 0.8 + ratio * 0.2;
        }
    }

    /// The codec for the next chunk, and the others to sample on it.
    pub fn choose(&self) -> (Codec, &'static [Codec]) {
        match self.fixed {
            Compression::None => return (Codec::None, &[]),
            Compression::Lz4 => return (Codec::Lz4, &[]),
            Compression::Zstd => return (Codec::Zstd, &[]),
            Compression::Auto => {}
        }
        let Ok(mut s) = self.state.lock() else {
            return (Codec::None, &[]);
        };
        s.chunks += 1;
        let sample = s.chunks % 32 == 1;
        let Some(bw) = s.link else {
            // Until the link is measured: raw, sampling the codecs.
            return (
                Codec::None,
                if sample {
                    &[Codec::Lz4, Codec::Zstd]
                } else {
                    &[]
                },
            );
        };
        let cost = |e: &Estimate| (1.0 / (e.speed * self.threads)).max(e.ratio / bw);
        let raw = 1.0 / bw;
        let (lz4, zstd) = (cost(&s.lz4), cost(&s.zstd));
        let best = if lz4 < raw * 0.95 && lz4 <= zstd {
            Codec::Lz4
        } else if zstd < raw * 0.95 {
            Codec::Zstd
        } else {
            Codec::None
        };
        let others: &'static [Codec] = match (sample, best) {
            (false, _) => &[],
            (true, Codec::None) => &[Codec::Lz4, Codec::Zstd],
            (true, Codec::Lz4) => &[Codec::Zstd],
            (true, Codec::Zstd) => &[Codec::Lz4],
        };
        (best, others)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page_like(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| if i % 512 < 8 { (i / 512) as u8 } else { 0 })
            .collect()
    }

    #[test]
    fn both_codecs_round_trip_and_incompressible_chunks_go_raw() {
        let mut c = Compressor::new();
        let raw = page_like(64 << 10);
        for codec in [Codec::Lz4, Codec::Zstd] {
            let (used, payload) = c.compress(codec, &raw);
            assert_eq!(used, codec);
            assert!(payload.len() < raw.len() / 4);
            let payload = payload.to_vec();
            let mut out = vec![0u8; raw.len()];
            decompress(used, &payload, &mut out).unwrap();
            assert_eq!(out, raw);
        }
        let mut noise = vec![0u8; 64 << 10];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert_eq!(c.compress(Codec::Zstd, &noise).0, Codec::None);
        assert_eq!(c.compress(Codec::Lz4, &noise).0, Codec::None);
    }

    #[test]
    fn payloads_that_do_not_expand_exactly_are_refused() {
        let mut c = Compressor::new();
        let raw = page_like(8192);
        for codec in [Codec::Lz4, Codec::Zstd] {
            let payload = c.compress(codec, &raw).1.to_vec();
            let mut small = vec![0u8; 4096];
            assert!(decompress(codec, &payload, &mut small).is_err());
            let mut big = vec![0u8; 12288];
            assert!(decompress(codec, &payload, &mut big).is_err());
        }
        assert!(decompress(Codec::None, &[1, 2], &mut [0u8; 3]).is_err());
    }

    proptest! {
        #[test]
        fn decompress_never_panics(codec in 0u8..3, payload in proptest::collection::vec(any::<u8>(), 0..300), n in 0usize..5000) {
            let codec = [Codec::None, Codec::Lz4, Codec::Zstd][codec as usize];
            let mut out = vec![0u8; n];
            let _ = decompress(codec, &payload, &mut out);
        }
    }

    #[test]
    fn auto_compresses_on_slow_links_and_not_on_fast_ones() {
        let p = AutoPolicy::new(Compression::Auto, 2);
        // Unmeasured link: raw, but the codecs get sampled.
        assert_eq!(p.choose(), (Codec::None, &[Codec::Lz4, Codec::Zstd][..]));
        p.observe(Codec::Lz4, 1 << 20, 100 << 10, Duration::from_millis(1));
        p.observe(Codec::Zstd, 1 << 20, 60 << 10, Duration::from_millis(4));
        // 12.5 MB/s (100 Mbit/s): compressing pays.
        p.observe_link(12_500_000, Duration::from_secs(1));
        assert_ne!(p.choose().0, Codec::None);
        // 10 GB/s: the link is faster than either codec on two threads.
        let fast = AutoPolicy::new(Compression::Auto, 2);
        fast.observe_link(10_000_000_000, Duration::from_secs(1));
        assert_eq!(fast.choose().0, Codec::None);
        // A fixed choice is kept whatever the link.
        let fixed = AutoPolicy::new(Compression::Zstd, 1);
        fixed.observe_link(10_000_000_000, Duration::from_secs(1));
        assert_eq!(fixed.choose().0, Codec::Zstd);
    }
}
