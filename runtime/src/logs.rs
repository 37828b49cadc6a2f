//! Container logs in the CRI format kubelet uses: one line per record,
//! `<RFC 3339 time> <stdout|stderr> <F|P> <text>` (`P` marks a partial line split at the
//! buffer size). The file is rotated when it passes its size cap: `container.log` becomes
//! `container.log.1` (the previous `.1` is dropped), so a chatty container never fills the disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const LOG_FILE: &str = "container.log";

/// Which output a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Formats a Unix time as RFC 3339 UTC with nanoseconds, without a date library.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "{}.{:09}Z",
        skiff_common::time::utc_seconds(d.as_secs() as i64),
        d.subsec_nanos()
    )
}

/// Appends records to a container's log, rotating at `max_bytes`.
pub struct LogWriter {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    /// Unterminated tail of each stream, waiting for its newline.
    pending: [Vec<u8>; 2],
    /// Bytes of records that could not be written (a full disk), and the last such error.
    dropped: u64,
    last_error: Option<String>,
}

/// Longest line kept whole; longer ones are split into `P` records.
const MAX_LINE: usize = 16 * 1024;

impl LogWriter {
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<LogWriter> {
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            path,
            file,
            size,
            max_bytes: max_bytes.max(4096),
            pending: [Vec::new(), Vec::new()],
            dropped: 0,
            last_error: None,
        })
    }

    /// Bytes of output lost because they could not be written, and the last reason.
    pub fn dropped(&self) -> (u64, Option<&str>) {
        (self.dropped, self.last_error.as_deref())
    }

    /// Feeds raw bytes read from one stream. A record that cannot be written (a full disk) is
    /// dropped and counted ([`LogWriter::dropped`]), never retried into memory without bound;
    /// the error is returned too.
    pub fn write(&mut self, stream: Stream, data: &[u8]) -> io::Result<()> {
        let idx = stream as usize;
        let mut buf = std::mem::take(&mut self.pending[idx]);
        buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
            let end = start + nl;
            self.record(stream, &buf[start..end], true)?;
            start = end + 1;
        }
        let mut rest = buf.split_off(start);
        while rest.len() >= MAX_LINE {
            let tail = rest.split_off(MAX_LINE);
            self.record(stream, &rest, false)?;
            rest = tail;
        }
        self.pending[idx] = rest;
        Ok(())
    }

    /// Writes out unterminated tails (at exit).
    pub fn flush(&mut self) -> io::Result<()> {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let rest = std::mem::take(&mut self.pending[stream as usize]);
            if !rest.is_empty() {
                self.record(stream, &rest, true)?;
            }
        }
        self.file.flush()
    }

    fn record(&mut self, stream: Stream, text: &[u8], full: bool) -> io::Result<()> {
        let mut line = format!(
            "{} {} {} ",
            rfc3339(SystemTime::now()),
            stream.as_str(),
            if full { "F" } else { "P" }
        )
        .into_bytes();
        line.extend_from_slice(text);
        line.push(b'\n');
        let written = (|| {
            if self.size + line.len() as u64 > self.max_bytes && self.size > 0 {
                self.rotate()?;
            }
            self.file.write_all(&line)
        })();
        match written {
            Ok(()) => {
                self.size += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.dropped += text.len() as u64 + u64::from(full);
                self.last_error = Some(format!("writing {}: {e}", self.path.display()));
                Err(e)
            }
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        let old = self.path.with_extension("log.1");
        fs::rename(&self.path, &old)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// One parsed record.
#[derive(Debug, PartialEq, Eq)]
pub struct Record {
    pub time: String,
    pub stream: Stream,
    pub partial: bool,
    pub text: String,
}

pub fn parse_line(line: &str) -> Option<Record> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?.to_string();
    let stream = match parts.next()? {
        "stdout" => Stream::Stdout,
        "stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = parts.next()? == "P";
    let text = parts.next().unwrap_or("").to_string();
    Some(Record {
        time,
        stream,
        partial,
        text,
    })
}

/// Reads every record of a container's log, the rotated file first.
pub fn read_all(dir: &Path) -> io::Result<Vec<Record>> {
    let mut out = Vec::new();
    for name in [format!("{LOG_FILE}.1"), LOG_FILE.to_string()] {
        let path = dir.join(name);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in BufReader::new(f).lines() {
            if let Some(r) = parse_line(&line?) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a full disk (here /dev/full) records are dropped and counted, not kept in memory.
    #[test]
    fn unwritable_output_is_counted_as_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/dev/full", dir.path().join(LOG_FILE)).expect("symlink");
        let mut w = LogWriter::open(dir.path(), 1 << 20).expect("open");
        assert_eq!(w.dropped(), (0, None));
        assert!(w.write(Stream::Stdout, b"lost line\n").is_err());
        assert!(w.write(Stream::Stderr, b"another\n").is_err());
        let (bytes, why) = w.dropped();
        assert_eq!(bytes, 18);
        assert!(
            why.is_some_and(|e| e.contains("No space left on device")),
            "{why:?}"
        );
    }

    #[test]
    fn lines_are_framed_split_and_rotated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = LogWriter::open(dir.path(), 4096).expect("open");
        w.write(Stream::Stdout, b"hello\nwor").expect("write");
        w.write(Stream::Stderr, b"oops\n").expect("write");
        w.write(Stream::Stdout, b"ld\n").expect("write");
        w.flush().expect("flush");
        let recs = read_all(dir.path()).expect("read");
        let texts: Vec<_> = recs.iter().map(|r| (r.stream, r.text.as_str())).collect();
        assert_eq!(
            texts,
            vec![
                (Stream::Stdout, "hello"),
                (Stream::Stderr, "oops"),
                (Stream::Stdout, "world")
            ]
        );
        assert!(
            recs[0].time.ends_with('Z') && recs[0].time.len() == 30,
            "{}",
            recs[0].time
        );
        // Rotation keeps the total bounded.
        for i in 0..500 {
            w.write(Stream::Stdout, format!("line {i}\n").as_bytes())
                .expect("write");
        }
        w.flush().expect("flush");
        let main = fs::metadata(dir.path().join(LOG_FILE)).expect("log").len();
        let old = fs::metadata(dir.path().join("container.log.1"))
            .expect("rotated")
            .len();
        assert!(main <= 4096 && old <= 4096, "{main} {old}");
        let last = read_all(dir.path()).expect("read").pop().expect("record");
        assert_eq!(last.text, "line 499");
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_709_251_199);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.000000000Z");
    }
}
