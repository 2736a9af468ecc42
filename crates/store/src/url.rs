//! Store and image addresses: `dir:///path` and `s3://bucket/prefix`, an
//! image being its store's address followed by `/NAME`.

use crate::error::StoreError;

/// Where a store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A directory on this host (`dir:///absolute/path`).
    Dir(std::path::PathBuf),
    /// An S3-compatible bucket and a key prefix (`s3://bucket/prefix`); the
    /// endpoint and credentials come from the environment.
    S3 {
        /// Bucket.
        bucket: String,
        /// Key prefix inside it, without slashes at either end ("" for none).
        prefix: String,
    },
}

fn bad(url: &str, problem: &'static str) -> StoreError {
    StoreError::BadUrl {
        url: url.to_string(),
        problem,
    }
}

/// Whether `s` names a store or an image in one (rather than a local file).
pub fn is_url(s: &str) -> bool {
    s.starts_with("dir://") || s.starts_with("s3://")
}

impl StoreUrl {
    /// Parses a store address.
    pub fn parse(url: &str) -> Result<StoreUrl, StoreError> {
        if let Some(rest) = url.strip_prefix("dir://") {
            if !rest.starts_with('/') {
                return Err(bad(
                    url,
                    "a dir:// address takes an absolute path (dir:///srv/images: three slashes)",
                ));
            }
            let path = rest.trim_end_matches('/');
            let path = if path.is_empty() { "/" } else { path };
            return Ok(StoreUrl::Dir(path.into()));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let rest = rest.trim_end_matches('/');
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad(
                    url,
                    "an s3:// address names a bucket (s3://bucket/prefix)",
                ));
            }
            if !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            {
                return Err(bad(
                    url,
                    "a bucket name holds lower-case letters, digits, '-' and '.'",
                ));
            }
            if prefix
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
                && !prefix.is_empty()
            {
                return Err(bad(url, "the key prefix has an empty, '.' or '..' segment"));
            }
            return Ok(StoreUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        Err(bad(
            url,
            "a store address starts with dir:// (a local directory) or s3:// (an S3-compatible store)",
        ))
    }

    /// Splits an image address into its store and the image's name (the
    /// last path segment).
    pub fn parse_image(url: &str) -> Result<(StoreUrl, String), StoreError> {
        let trimmed = url.trim_end_matches('/');
        let Some((store, name)) = trimmed.rsplit_once('/') else {
            return Err(bad(url, "an image address is a store address then /NAME"));
        };
        check_name(url, name)?;
        if store.ends_with(":/") || store.ends_with("://") {
            // "dir:///name" or "s3://name": no store part.
            return Err(bad(url, "an image address is a store address then /NAME"));
        }
        let store = StoreUrl::parse(store)?;
        Ok((store, name.to_string()))
    }
}

/// Checks an image name: one path segment of printable ASCII.
pub fn check_name(url: &str, name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'));
    if ok {
        Ok(())
    } else {
        Err(bad(
            url,
            "an image name is 1-200 letters, digits, '-', '_', '.' or '+' (rename it with --name)",
        ))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Dir(p) => write!(f, "dir://{}", p.display()),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stores_and_images() {
        assert_eq!(
            StoreUrl::parse("dir:///srv/img/").unwrap(),
            StoreUrl::Dir("/srv/img".into())
        );
        assert_eq!(
            StoreUrl::parse("s3://b-1/a/b").unwrap(),
            StoreUrl::S3 {
                bucket: "b-1".into(),
                prefix: "a/b".into()
            }
        );
        let (s, n) = StoreUrl::parse_image("s3://bkt/vm.lpimg").unwrap();
        assert_eq!(s.to_string(), "s3://bkt");
        assert_eq!(n, "vm.lpimg");
        let (s, n) = StoreUrl::parse_image("dir:///tmp/st/ck-3").unwrap();
        assert_eq!(s, StoreUrl::Dir("/tmp/st".into()));
        assert_eq!(n, "ck-3");
        assert_eq!(
            StoreUrl::parse("s3://bkt/x").unwrap().to_string(),
            "s3://bkt/x"
        );
    }

    #[test]
    fn refuses_bad_addresses_with_the_fix() {
        for u in [
            "dir://rel/path",
            "s3://",
            "s3://Big/x",
            "s3://b//x",
            "http://x",
            "s3://b/../x",
        ] {
            let e = StoreUrl::parse(u).unwrap_err().to_string();
            assert!(e.contains(u), "{e}");
        }
        assert!(StoreUrl::parse_image("s3://bkt").is_err());
        assert!(StoreUrl::parse_image("dir:///x/a b").is_err());
        assert!(StoreUrl::parse_image("dir:///name").is_err());
    }
}
