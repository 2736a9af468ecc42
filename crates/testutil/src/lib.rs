//! Helpers for kernel-feature tests: skip with a printed reason, or fail when
//! `LIVEPAGE_REQUIRE_ALL=1` says the machine must have everything.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// Whether skips are failures (`LIVEPAGE_REQUIRE_ALL=1`).
pub fn require_all() -> bool {
    std::env::var("LIVEPAGE_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Reports a skipped test. Panics instead when `LIVEPAGE_REQUIRE_ALL=1`.
pub fn skip(test: &str, reason: &str) {
    if require_all() {
        panic!("{test}: required feature missing ({reason}) and LIVEPAGE_REQUIRE_ALL=1");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// `require!(cond, "reason")`: returns from the test (printing SKIPPED) when
/// `cond` is false, or fails it under `LIVEPAGE_REQUIRE_ALL=1`.
#[macro_export]
macro_rules! require {
    ($cond:expr, $($reason:tt)+) => {
        if !$cond {
            $crate::skip(module_path!(), &format!($($reason)+));
            return;
        }
    };
}
