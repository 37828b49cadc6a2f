//! Digests and a reader that hashes and counts what passes through it.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use super::ImageError;

/// Returns `s` as a `sha256:<64 lowercase hex>` digest, or `None`. Only such digests are
/// accepted anywhere a digest becomes a path (no traversal through a crafted digest).
pub(crate) fn parse_sha256(s: &str) -> Option<String> {
    let hex = s.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| s.to_owned())
}

/// The hex part of an already validated `sha256:` digest.
pub(crate) fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Checks that an oci-spec digest is sha256 (the only algorithm supported) and returns it.
pub(crate) fn sha256_of<'a>(
    digest: &'a oci_spec::image::Digest,
    kind: &'static str,
) -> Result<&'a str, ImageError> {
    let s = digest.as_ref();
    match parse_sha256(s) {
        Some(_) => Ok(s),
        None => Err(ImageError::Invalid {
            kind,
            digest: s.to_owned(),
            reason: "unsupported digest algorithm (only sha256 is supported)".to_owned(),
        }),
    }
}

/// `sha256:<hex>` of `bytes`.
#[cfg(test)]
pub(crate) fn digest_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Hashes (sha256) and counts the bytes read through it. With a limit, reading more than
/// `limit` bytes fails, so a blob that is longer than its descriptor says cannot fill the disk.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: Option<u64>,
    eof: bool,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R, limit: Option<u64>) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
            eof: false,
        }
    }

    /// Bytes read so far.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Whether the underlying reader reached its end.
    pub(crate) fn at_eof(&self) -> bool {
        self.eof
    }

    /// `sha256:<hex>` of everything read so far.
    pub(crate) fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    /// Reads and hashes the rest of the stream (up to the limit), discarding it.
    pub(crate) fn drain(&mut self) -> io::Result<u64> {
        io::copy(self, &mut io::sink())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(limit) = self.limit
            && self.count > limit
        {
            return Err(io::Error::other("blob is longer than its descriptor says"));
        }
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if let Some(limit) = self.limit
            && self.count > limit
        {
            return Err(io::Error::other("blob is longer than its descriptor says"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_sha256_hex() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(parse_sha256(&good), Some(good.clone()));
        assert_eq!(hex_of(&good), "a".repeat(64));
        for bad in [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:../{}", "a".repeat(61)),
            "a".repeat(64),
        ] {
            assert_eq!(parse_sha256(&bad), None, "{bad}");
        }
    }

    #[test]
    fn hashes_counts_and_limits() {
        let data = b"hello world";
        let mut r = HashingReader::new(&data[..], Some(11));
        assert_eq!(r.drain().expect("drain"), 11);
        assert!(r.at_eof());
        assert_eq!(r.count(), 11);
        assert_eq!(r.digest(), digest_bytes(data));

        let mut r = HashingReader::new(&data[..], Some(5));
        assert!(r.drain().is_err());
        assert!(r.count() > 5);
    }
}
