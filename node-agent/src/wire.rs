//! Newline-delimited JSON messages on a Unix stream socket, each carrying up
//! to `MAX_FDS` file descriptors (SCM_RIGHTS) with its first bytes: how the
//! agent hands a VMM the capture it writes or restores from.

use std::io::{IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 4;

/// Sends `message` as one line, with `fds` attached.
pub fn send(
    stream: &UnixStream,
    message: &impl serde::Serialize,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty()
        && (fds.len() > MAX_FDS || !control.push(SendAncillaryMessage::ScmRights(fds)))
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one message (at most {MAX_FDS})",
                fds.len()
            ),
        ));
    }
    let sent = sendmsg(
        stream,
        &[IoSlice::new(&line)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptors went with the first bytes; the rest follows plainly.
    let mut rest = stream;
    rest.write_all(&line[sent..])
}

/// Reads lines and the descriptors that came with them.
pub struct Reader<'a> {
    stream: &'a UnixStream,
    buffer: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl<'a> Reader<'a> {
    pub fn new(stream: &'a UnixStream) -> Self {
        Self {
            stream,
            buffer: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// The next line (without its newline) and its descriptors; `None` once
    /// the peer closed the connection between lines.
    pub fn next_line(&mut self) -> std::io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&byte| byte == b'\n') {
                let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
                line.pop();
                return Ok(Some((line, std::mem::take(&mut self.fds))));
            }
            let mut chunk = [0u8; 64 * 1024];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = match recvmsg(
                self.stream,
                &mut [IoSliceMut::new(&mut chunk)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(received) => received,
                Err(rustix::io::Errno::INTR) => continue,
                Err(errno) => return Err(errno.into()),
            };
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = message {
                    self.fds.extend(fds);
                }
            }
            if received.bytes == 0 {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed mid-message",
                ));
            }
            self.buffer.extend_from_slice(&chunk[..received.bytes]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek};
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn lines_arrive_with_their_descriptors() {
        let (left, right) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"captured").unwrap();
        send(&left, &serde_json::json!({"op": "one"}), &[file.as_fd()]).unwrap();
        send(&left, &serde_json::json!({"op": "two"}), &[]).unwrap();
        drop(left);

        let mut reader = Reader::new(&right);
        let (line, fds) = reader.next_line().unwrap().unwrap();
        assert_eq!(line, br#"{"op":"one"}"#);
        assert_eq!(fds.len(), 1);
        let mut received = std::fs::File::from(fds.into_iter().next().unwrap());
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "captured");

        let (line, fds) = reader.next_line().unwrap().unwrap();
        assert_eq!(line, br#"{"op":"two"}"#);
        assert!(fds.is_empty());
        assert!(reader.next_line().unwrap().is_none());
    }

    #[test]
    fn a_long_line_is_read_whole() {
        let (left, right) = UnixStream::pair().unwrap();
        let long = "x".repeat(300_000);
        let writer = std::thread::spawn(move || send(&left, &long, &[]).unwrap());
        let (line, _) = Reader::new(&right).next_line().unwrap().unwrap();
        writer.join().unwrap();
        assert_eq!(line.len(), 300_002);
    }

    #[test]
    fn too_many_descriptors_are_refused() {
        let (left, _right) = UnixStream::pair().unwrap();
        let fds = vec![left.as_fd(); MAX_FDS + 1];
        let err = send(&left, &1, &fds).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_message_cut_short_is_an_error() {
        let (mut left, right) = UnixStream::pair().unwrap();
        left.write_all(b"{\"op\"").unwrap();
        drop(left);
        let err = Reader::new(&right).next_line().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
