//! `:authority` on the Unix socket. gRPC's core library (the Python, C++, Ruby and PHP
//! clients) and grpc-java send the socket path, percent-encoded, as the HTTP/2 `:authority`
//! of every call on a `unix:` channel (`tmp%2Fcorral.sock`). The HTTP/2 server under tonic
//! (h2) parses `:authority` as a URI authority and resets every stream whose value is not one
//! (`PROTOCOL_ERROR`), before hyper or tonic see the request; it has no option to relax that.
//! On a Unix socket the authority names nothing, so [`AuthorityFix`] sits between the socket
//! and the HTTP/2 server: it reads the client's frames, decodes every header block (HPACK,
//! with the client's dynamic table), puts `localhost` in place of an `:authority` the server
//! would refuse, and re-encodes the block without touching the server's dynamic table. All
//! other frames pass through unchanged; TCP/TLS connections never go through it, so HTTP/2
//! stays strict there. A connection whose first request carries an authority the server
//! takes (tonic, grpc-go, grpcurl) is passed through untouched from then on: only clients
//! that need it pay for decoding.
//!
//! Anything that is not well-formed HTTP/2 from the client's side (a bad preface, a frame
//! over the size the server allows) is passed through untouched from that point on, for the
//! server to refuse as it would without this layer; a header block that cannot be decoded,
//! or decodes to more than [`MAX_HEADER_LIST`], ends the connection.
//!
//! Imports nothing from the crate.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// What a client sends first on an HTTP/2 connection.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame header: length (24 bits), type, flags, stream id (31 bits).
const FRAME_HEAD: usize = 9;
/// The largest frame payload the server accepts (SETTINGS_MAX_FRAME_SIZE; the server keeps
/// the protocol's default).
const MAX_FRAME: usize = 16_384;
/// The dynamic table size the server allows the client's encoder (SETTINGS_HEADER_TABLE_SIZE;
/// the server keeps the protocol's default).
const MAX_TABLE: usize = 4_096;
/// The most header block (compressed) a client may send for one request.
const MAX_BLOCK: usize = 256 << 10;
/// The most a header block may decode to (names + values + 32 per field, as HPACK counts);
/// the server itself refuses lists over its own, smaller, limit.
pub const MAX_HEADER_LIST: usize = 1 << 20;
/// What an `:authority` the server would refuse becomes.
const REPLACEMENT: &[u8] = b"localhost";

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Rewrites the client-to-server half of an HTTP/2 connection (see the module docs). Feed it
/// what the client sent, in pieces of any size; it appends what the server should read.
pub struct AuthorityFix {
    state: State,
    /// Bytes received and not consumed yet.
    input: Vec<u8>,
    decoder: loona_hpack::Decoder<'static>,
    /// The header block being gathered (HEADERS, then CONTINUATION frames).
    block: Vec<u8>,
    open: Option<OpenBlock>,
    /// The frames of the first header block, as received: forwarded as they are when
    /// nothing in it needs replacing.
    first: Option<Vec<u8>>,
    /// `:authority` values replaced so far.
    replaced: u64,
}

impl std::fmt::Debug for AuthorityFix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("state", &self.state)
            .field("buffered", &self.input.len())
            .field("replaced", &self.replaced)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes of the preface seen so far.
    Preface(usize),
    /// Waiting for a frame header.
    Head,
    /// Copying this many more payload bytes of a frame that is passed through.
    Copy(usize),
    /// Waiting for the whole payload of a HEADERS or CONTINUATION frame.
    Block(FrameHead),
    /// Not HTTP/2 as the server accepts it: everything passes through untouched.
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8]) -> FrameHead {
        FrameHead {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        // A frame's length is 24 bits on the wire (`len` is parsed from three bytes, and
        // frames built here are far smaller); the top byte is dropped.
        let len = u32::try_from(self.len).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&self.stream.to_be_bytes());
    }
}

/// The HEADERS frame a header block started with.
#[derive(Debug, Clone, Copy)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
}

/// Why a connection was ended.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("malformed HTTP/2 frame from the client: {0}")]
    Frame(&'static str),
    #[error("undecodable header block from the client: {0}")]
    Hpack(String),
    #[error("header block from the client over the {0}-byte limit")]
    TooLarge(usize),
}

impl From<AuthorityError> for io::Error {
    fn from(e: AuthorityError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl Default for AuthorityFix {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE);
        AuthorityFix {
            state: State::Preface(0),
            input: Vec::new(),
            decoder,
            block: Vec::new(),
            open: None,
            first: Some(Vec::new()),
            replaced: 0,
        }
    }
}

impl AuthorityFix {
    /// How many `:authority` values were replaced so far.
    pub fn replaced(&self) -> u64 {
        self.replaced
    }

    /// Take `data` from the client and append what the server should read to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        self.input.extend_from_slice(data);
        let mut at = 0;
        let result = self.run(&mut at, out);
        self.input.drain(..at);
        result
    }

    /// Consume as much of `input[*at..]` as can be handled now.
    fn run(&mut self, at: &mut usize, out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        loop {
            let avail = &self.input[*at..];
            match self.state {
                State::Raw => {
                    out.extend_from_slice(avail);
                    *at += avail.len();
                    return Ok(());
                }
                State::Preface(seen) => {
                    let n = avail.len().min(PREFACE.len() - seen);
                    if n == 0 {
                        return Ok(());
                    }
                    let matches = avail[..n] == PREFACE[seen..seen + n];
                    out.extend_from_slice(&avail[..n]);
                    *at += n;
                    self.state = if !matches {
                        State::Raw
                    } else if seen + n == PREFACE.len() {
                        State::Head
                    } else {
                        State::Preface(seen + n)
                    };
                }
                State::Head => {
                    if avail.len() < FRAME_HEAD {
                        return Ok(());
                    }
                    let head = FrameHead::parse(&avail[..FRAME_HEAD]);
                    let is_block = head.kind == HEADERS || head.kind == CONTINUATION;
                    if self.open.is_some() && (head.kind != CONTINUATION || head.len > MAX_FRAME) {
                        return Err(AuthorityError::Frame(
                            "a header block not continued by CONTINUATION frames",
                        ));
                    }
                    if head.len > MAX_FRAME || head.kind == PUSH_PROMISE {
                        // The server refuses these itself (FRAME_SIZE_ERROR, PROTOCOL_ERROR).
                        self.state = State::Raw;
                        continue;
                    }
                    *at += FRAME_HEAD;
                    if is_block {
                        self.state = State::Block(head);
                    } else {
                        head.write(out);
                        self.state = State::Copy(head.len);
                    }
                }
                State::Copy(left) => {
                    let n = avail.len().min(left);
                    out.extend_from_slice(&avail[..n]);
                    *at += n;
                    if n == left {
                        self.state = State::Head;
                    } else {
                        self.state = State::Copy(left - n);
                        return Ok(());
                    }
                }
                State::Block(head) => {
                    if avail.len() < head.len {
                        return Ok(());
                    }
                    let payload = avail[..head.len].to_vec();
                    *at += head.len;
                    self.state = State::Head;
                    if let Some(first) = self.first.as_mut() {
                        head.write(first);
                        first.extend_from_slice(&payload);
                    }
                    self.block_frame(head, &payload, out)?;
                }
            }
        }
    }

    /// One HEADERS or CONTINUATION frame; the block is re-encoded once it is complete.
    fn block_frame(
        &mut self,
        head: FrameHead,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AuthorityError> {
        let fragment = if head.kind == HEADERS {
            let mut body = payload;
            if head.flags & PADDED != 0 {
                let (&pad, rest) = body
                    .split_first()
                    .ok_or(AuthorityError::Frame("PADDED HEADERS without a pad length"))?;
                let keep =
                    rest.len()
                        .checked_sub(usize::from(pad))
                        .ok_or(AuthorityError::Frame(
                            "HEADERS padding longer than the frame",
                        ))?;
                body = &rest[..keep];
            }
            let priority = if head.flags & PRIORITY != 0 {
                let (p, rest) = body
                    .split_first_chunk::<5>()
                    .ok_or(AuthorityError::Frame("HEADERS too short for its priority"))?;
                body = rest;
                Some(*p)
            } else {
                None
            };
            self.open = Some(OpenBlock {
                stream: head.stream,
                end_stream: head.flags & END_STREAM != 0,
                priority,
            });
            body
        } else {
            match self.open {
                Some(open) if open.stream == head.stream => payload,
                _ => {
                    return Err(AuthorityError::Frame(
                        "CONTINUATION without a header block open on its stream",
                    ));
                }
            }
        };
        if self.block.len() + fragment.len() > MAX_BLOCK {
            return Err(AuthorityError::TooLarge(MAX_BLOCK));
        }
        self.block.extend_from_slice(fragment);
        if head.flags & END_HEADERS == 0 {
            return Ok(());
        }
        let open = self
            .open
            .take()
            .ok_or(AuthorityError::Frame("a header block without HEADERS"))?;
        let block = std::mem::take(&mut self.block);
        let replaced_before = self.replaced;
        let encoded = self.reencode(&block)?;
        if let Some(first) = self.first.take()
            && self.replaced == replaced_before
        {
            // The server takes this client's authority: from here on it reads the client as
            // it is (its dynamic table and the client's stay the same).
            out.extend_from_slice(&first);
            self.state = State::Raw;
            return Ok(());
        }
        write_block(open, &encoded, out);
        Ok(())
    }

    /// Decode a whole header block and encode it again, every field a literal without
    /// indexing, with `:authority` replaced when the server would refuse it.
    fn reencode(&mut self, block: &[u8]) -> Result<Vec<u8>, AuthorityError> {
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut size = 0usize;
        let mut replaced = 0u64;
        let decoder = &mut self.decoder;
        // The decoder is a third-party parser fed by the client: a panic in it ends this
        // connection only.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decoder.decode_with_cb(block, |name: Cow<[u8]>, value: Cow<[u8]>| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size > MAX_HEADER_LIST {
                    return;
                }
                let value: &[u8] = if &*name == b":authority" && !valid_authority(&value) {
                    replaced += 1;
                    REPLACEMENT
                } else {
                    &value
                };
                literal(&name, value, &mut out);
            })
        }));
        match decoded {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(AuthorityError::Hpack(format!("{e:?}"))),
            Err(_) => return Err(AuthorityError::Hpack("the decoder panicked".into())),
        }
        if size > MAX_HEADER_LIST {
            return Err(AuthorityError::TooLarge(MAX_HEADER_LIST));
        }
        self.replaced += replaced;
        Ok(out)
    }
}

/// Whether the HTTP/2 server takes `value` as an `:authority` (the same parser it uses).
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// A literal header field without indexing, new name (RFC 7541 §6.2.2), no Huffman coding.
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for s in [name, value] {
        loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out)
            .expect("writing to a Vec cannot fail");
        out.extend_from_slice(s);
    }
}

/// The block as a HEADERS frame and as many CONTINUATION frames as it needs.
fn write_block(open: OpenBlock, block: &[u8], out: &mut Vec<u8>) {
    let prio_len = if open.priority.is_some() { 5 } else { 0 };
    let first = block.len().min(MAX_FRAME - prio_len);
    let (head_part, mut rest) = block.split_at(first);
    let mut flags = 0;
    if open.end_stream {
        flags |= END_STREAM;
    }
    if open.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    FrameHead {
        len: prio_len + head_part.len(),
        kind: HEADERS,
        flags,
        stream: open.stream,
    }
    .write(out);
    if let Some(p) = open.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(head_part);
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME);
        let (part, tail) = rest.split_at(n);
        FrameHead {
            len: n,
            kind: CONTINUATION,
            flags: if tail.is_empty() { END_HEADERS } else { 0 },
            stream: open.stream,
        }
        .write(out);
        out.extend_from_slice(part);
        rest = tail;
    }
}

/// A byte stream whose reads go through an [`AuthorityFix`]; writes pass straight through.
#[derive(Debug)]
pub struct FixAuthority<S> {
    io: S,
    fix: AuthorityFix,
    /// Rewritten bytes not yet handed to the reader, from `pos` on.
    ready: Vec<u8>,
    pos: usize,
    /// Set when the fix failed: reads return it from then on.
    failed: Option<String>,
}

impl<S> FixAuthority<S> {
    pub fn new(io: S) -> Self {
        FixAuthority {
            io,
            fix: AuthorityFix::default(),
            ready: Vec::new(),
            pos: 0,
            failed: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.pos < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.pos);
                buf.put_slice(&this.ready[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.ready.len() {
                    this.ready.clear();
                    this.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(why) = &this.failed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why.clone())));
            }
            let mut raw = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut raw);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let got = rb.filled();
            if got.is_empty() {
                // End of stream.
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = this.fix.feed(got, &mut this.ready) {
                tracing::debug!(error = %e, "closing an API connection on the Unix socket");
                // What was rewritten before the error is still delivered first.
                this.failed = Some(e.to_string());
            }
        }
    }
}

write_through!(FixAuthority);

#[cfg(test)]
mod tests {
    use super::*;

    type Fields = Vec<(String, String)>;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        FrameHead {
            len: payload.len(),
            kind,
            flags,
            stream,
        }
        .write(&mut out);
        out.extend_from_slice(payload);
        out
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// A literal with incremental indexing of `:authority` (static name index 1).
    fn indexed_authority(value: &str) -> Vec<u8> {
        let mut b = vec![0x41];
        loona_hpack::encoder::encode_integer_into(value.len(), 7, 0, &mut b).expect("vec");
        b.extend_from_slice(value.as_bytes());
        b
    }

    /// Split frames; panics on a truncated one.
    fn frames(mut bytes: &[u8]) -> Vec<(FrameHead, Vec<u8>)> {
        let mut v = Vec::new();
        while !bytes.is_empty() {
            let head = FrameHead::parse(&bytes[..FRAME_HEAD]);
            let payload = bytes[FRAME_HEAD..FRAME_HEAD + head.len].to_vec();
            bytes = &bytes[FRAME_HEAD + head.len..];
            v.push((head, payload));
        }
        v
    }

    /// Decode the header blocks of `bytes` (frames after the preface) as the server would.
    fn blocks(bytes: &[u8]) -> Vec<(FrameHead, Fields)> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut out = Vec::new();
        let mut block = Vec::new();
        let mut first = None;
        for (head, payload) in frames(bytes) {
            match head.kind {
                HEADERS => {
                    assert_eq!(head.flags & PADDED, 0, "never padded");
                    let skip = if head.flags & PRIORITY != 0 { 5 } else { 0 };
                    block.extend_from_slice(&payload[skip..]);
                    first = Some(head);
                }
                CONTINUATION => block.extend_from_slice(&payload),
                _ => continue,
            }
            assert!(head.len <= MAX_FRAME, "{head:?}");
            if head.flags & END_HEADERS != 0 {
                let fields = decoder
                    .decode(&block)
                    .expect("the output decodes")
                    .into_iter()
                    .map(|(n, v)| {
                        (
                            String::from_utf8(n).expect("utf-8"),
                            String::from_utf8(v).expect("utf-8"),
                        )
                    })
                    .collect();
                out.push((first.take().expect("HEADERS first"), fields));
                block.clear();
            }
        }
        out
    }

    /// Feed `input` in pieces of `chunk` bytes; the output after the preface.
    fn run(input: &[u8], chunk: usize) -> Result<(AuthorityFix, Vec<u8>), AuthorityError> {
        let mut fix = AuthorityFix::default();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            fix.feed(piece, &mut out)?;
        }
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        out.drain(..PREFACE.len());
        Ok((fix, out))
    }

    fn with_preface(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        for f in frames {
            v.extend_from_slice(f);
        }
        v
    }

    fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_path_as_authority_becomes_localhost_also_when_indexed() {
        // What grpc-core sends on `unix:/run/corral/corral.sock`: the path percent-encoded,
        // entered in its dynamic table, then referred to by index on the next call.
        let mut first = hex("8386"); // :method POST, :scheme http
        first.extend(indexed_authority("run%2Fcorral%2Fcorral.sock"));
        first.extend(hex("44 0f 2f 63 6f 72 72 61 6c 2e 76 31 2f 4c 69 73 74")); // :path, indexed
        let second = hex("83 86 bf be"); // POST, http, :path and :authority by index
        let input = with_preface(&[
            frame(0x4, 0, 0, &[]), // SETTINGS
            frame(HEADERS, END_HEADERS, 1, &first),
            frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]), // DATA
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &second),
        ]);
        for chunk in [1, 2, 7, 4096] {
            let (fix, out) = run(&input, chunk).expect("rewritten");
            let b = blocks(&out);
            assert_eq!(b.len(), 2, "chunk {chunk}");
            for (head, fields) in &b {
                assert_eq!(field(fields, ":authority"), Some("localhost"), "{fields:?}");
                assert_eq!(
                    field(fields, ":path"),
                    Some("/corral.v1/List"),
                    "{fields:?}"
                );
                assert_eq!(field(fields, ":method"), Some("POST"));
                assert!([1, 3].contains(&head.stream));
            }
            assert_eq!(b[0].0.flags & END_STREAM, 0);
            assert_ne!(b[1].0.flags & END_STREAM, 0, "END_STREAM kept");
            assert_eq!(fix.replaced(), 2);
            // Every other frame passes through as it was.
            let other: Vec<_> = frames(&out)
                .into_iter()
                .filter(|(h, _)| h.kind != HEADERS)
                .collect();
            assert_eq!(other.len(), 2);
            assert_eq!(other[0].0.kind, 0x4);
            assert_eq!(other[1].1, vec![0, 0, 0, 0, 0]);
        }
    }

    #[test]
    fn valid_authorities_and_huffman_coding_are_kept() {
        // RFC 7541 C.4.1 and C.4.2: Huffman-coded, the second refers to the first's entry.
        let c41 = hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
        let c42 = hex("8286 84be 5886 a8eb 1064 9cbf");
        let input = with_preface(&[
            frame(HEADERS, END_HEADERS | END_STREAM, 1, &c41),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &c42),
        ]);
        let (fix, out) = run(&input, 3).expect("rewritten");
        let b = blocks(&out);
        assert_eq!(field(&b[0].1, ":authority"), Some("www.example.com"));
        assert_eq!(field(&b[1].1, ":authority"), Some("www.example.com"));
        assert_eq!(field(&b[1].1, "cache-control"), Some("no-cache"));
        assert_eq!(field(&b[0].1, ":path"), Some("/"));
        assert_eq!(fix.replaced(), 0);
        // A client whose first authority the server takes is passed through as it is, later
        // requests included (a path sent later is the server's to refuse, as without this).
        assert_eq!(out, input[PREFACE.len()..]);
        let mut later = input.clone();
        later.extend(frame(HEADERS, END_HEADERS, 5, &indexed_authority("a%2Fb")));
        let (fix, out) = run(&later, 7).expect("passed");
        assert_eq!(out, later[PREFACE.len()..]);
        assert_eq!(fix.replaced(), 0);
    }

    #[test]
    fn padding_priority_and_continuation_are_understood() {
        let mut block = hex("8386 84");
        block.extend(indexed_authority("%2Ftmp%2Fa.sock"));
        block.extend(hex("40 02 74 65 02 68 69")); // te: hi, literal name
        let (a, b) = block.split_at(4);
        // PADDED + PRIORITY: pad length, 5 priority bytes, fragment, padding.
        let mut payload = vec![3];
        payload.extend([0x80, 0, 0, 0, 42]);
        payload.extend_from_slice(a);
        payload.extend([0, 0, 0]);
        let input = with_preface(&[
            frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload),
            frame(CONTINUATION, END_HEADERS, 5, b),
        ]);
        let (_, out) = run(&input, 5).expect("rewritten");
        let f = frames(&out);
        assert_eq!(f.len(), 1, "one HEADERS frame: {f:?}");
        let (head, payload) = &f[0];
        assert_eq!(head.flags, PRIORITY | END_STREAM | END_HEADERS);
        assert_eq!(&payload[..5], &[0x80, 0, 0, 0, 42], "priority kept");
        let b = blocks(&out);
        assert_eq!(field(&b[0].1, ":authority"), Some("localhost"));
        assert_eq!(field(&b[0].1, "te"), Some("hi"));
    }

    #[test]
    fn a_block_that_grows_is_split_into_continuation_frames() {
        // One 3000-byte value entered in the table, then referred to 12 times: 36 KB out
        // (after an authority to replace, as a literal without indexing).
        let mut block = vec![0x01, 5];
        block.extend(b"a%2Fb");
        block.extend([0x40, 0x01, b'x']);
        loona_hpack::encoder::encode_integer_into(3000, 7, 0, &mut block).expect("vec");
        block.extend(std::iter::repeat_n(b'v', 3000));
        block.extend(std::iter::repeat_n(0xbe, 12));
        let input = with_preface(&[frame(HEADERS, END_HEADERS, 1, &block)]);
        let (_, out) = run(&input, 4096).expect("rewritten");
        let f = frames(&out);
        assert!(f.len() >= 3, "{} frames", f.len());
        assert_eq!(f[0].0.kind, HEADERS);
        assert!(f[1..].iter().all(|(h, _)| h.kind == CONTINUATION));
        let ends: Vec<bool> = f.iter().map(|(h, _)| h.flags & END_HEADERS != 0).collect();
        assert_eq!(ends.iter().filter(|e| **e).count(), 1);
        assert!(ends[ends.len() - 1]);
        let b = blocks(&out);
        assert_eq!(b[0].1.len(), 14);
        assert_eq!(b[0].1[0], (":authority".into(), "localhost".into()));
        assert!(b[0].1[1..].iter().all(|(n, v)| n == "x" && v.len() == 3000));
    }

    #[test]
    fn what_the_server_refuses_anyway_passes_through_untouched() {
        // Not HTTP/2.
        let junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let mut fix = AuthorityFix::default();
        let mut out = Vec::new();
        fix.feed(&junk, &mut out).expect("passed");
        assert_eq!(out, junk);
        // A frame over the server's frame size, and everything after it.
        let big = frame(HEADERS, END_HEADERS, 1, &vec![0x82; MAX_FRAME + 1]);
        let input = with_preface(&[big.clone(), frame(0x4, 0, 0, &[])]);
        let (_, out) = run(&input, 1000).expect("passed");
        assert_eq!(out, input[PREFACE.len()..]);
        // A PUSH_PROMISE (only servers send those).
        let input = with_preface(&[frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82])]);
        let (_, out) = run(&input, 1000).expect("passed");
        assert_eq!(out, input[PREFACE.len()..]);
    }

    #[test]
    fn malformed_header_blocks_end_the_connection() {
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("index 0", vec![frame(HEADERS, END_HEADERS, 1, &[0x80])]),
            (
                "index past the tables",
                vec![frame(HEADERS, END_HEADERS, 1, &[0xff, 0x40])],
            ),
            (
                "table size over the server's",
                vec![frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x7f, 0x82])],
            ),
            (
                "truncated literal",
                vec![frame(HEADERS, END_HEADERS, 1, &[0x41, 0x0a, b'a'])],
            ),
            (
                "continuation without headers",
                vec![frame(CONTINUATION, END_HEADERS, 1, &[0x82])],
            ),
            (
                "headers then data",
                vec![
                    frame(HEADERS, 0, 1, &[0x82]),
                    frame(0x0, END_STREAM, 1, &[]),
                ],
            ),
            (
                "continuation on another stream",
                vec![
                    frame(HEADERS, 0, 1, &[0x82]),
                    frame(CONTINUATION, END_HEADERS, 3, &[0x86]),
                ],
            ),
            (
                "padding longer than the frame",
                vec![frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82])],
            ),
            (
                "priority cut short",
                vec![frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0])],
            ),
        ];
        for (what, frames) in cases {
            let r = run(&with_preface(&frames), 3);
            assert!(r.is_err(), "{what}: accepted");
        }
    }

    #[test]
    fn a_header_list_bomb_is_refused() {
        // A 4000-byte entry referred to by one byte each: 16 KB in, 64 MB decoded.
        let mut block = vec![0x40, 0x01, b'x'];
        loona_hpack::encoder::encode_integer_into(4000, 7, 0, &mut block).expect("vec");
        block.extend(std::iter::repeat_n(b'v', 4000));
        let mut frames_in = vec![frame(HEADERS, 0, 1, &block)];
        for _ in 0..15 {
            frames_in.push(frame(CONTINUATION, 0, 1, &vec![0xbe; MAX_FRAME]));
        }
        frames_in.push(frame(CONTINUATION, END_HEADERS, 1, &[0xbe]));
        match run(&with_preface(&frames_in), MAX_FRAME) {
            Err(AuthorityError::TooLarge(n)) => assert_eq!(n, MAX_HEADER_LIST),
            other => panic!("{:?}", other.map(|(_, o)| o.len())),
        }
        // Sending more compressed bytes than any request needs.
        let mut frames_in = vec![frame(HEADERS, 0, 1, &[0x82])];
        for _ in 0..(MAX_BLOCK / MAX_FRAME + 1) {
            frames_in.push(frame(CONTINUATION, 0, 1, &vec![0x82; MAX_FRAME]));
        }
        assert!(matches!(
            run(&with_preface(&frames_in), MAX_FRAME),
            Err(AuthorityError::TooLarge(_))
        ));
    }

    /// What the real HTTP/2 server answers a health Check whose `:authority` is `authority`:
    /// `Ok(grpc-status)` or `Err(RST_STREAM error code)`.
    async fn check_through(authority: &str, fix: bool) -> Result<String, u32> {
        use crate::api::auth::{Caller, Role};
        use crate::api::conn::Conn;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (mut client, server) = tokio::io::duplex(1 << 16);
        let caller = Caller {
            who: "t".into(),
            peer: "p".into(),
            role: Role::Admin,
            conn: Default::default(),
        };
        let (_reporter, health) = tonic_health::server::health_reporter();
        let router = tonic::transport::Server::builder().add_service(health);
        let idle = std::time::Duration::from_secs(60);
        if fix {
            let conn = Conn::new(FixAuthority::new(server), caller, idle);
            tokio::spawn(
                router.serve_with_incoming(tokio_stream::iter([Ok::<_, io::Error>(conn)])),
            );
        } else {
            let conn = Conn::new(server, caller, idle);
            tokio::spawn(
                router.serve_with_incoming(tokio_stream::iter([Ok::<_, io::Error>(conn)])),
            );
        }
        let mut block = hex("8386");
        for (name, value) in [
            (":path", "/grpc.health.v1.Health/Check"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            literal(name.as_bytes(), value.as_bytes(), &mut block);
        }
        let input = with_preface(&[
            frame(0x4, 0, 0, &[]),
            frame(HEADERS, END_HEADERS, 1, &block),
            frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]),
        ]);
        client.write_all(&input).await.expect("write");
        let mut decoder = loona_hpack::Decoder::new();
        let mut got = Vec::new();
        let read = async {
            loop {
                let mut b = [0u8; 4096];
                let n = client.read(&mut b).await.expect("read");
                assert!(n > 0, "connection closed");
                got.extend_from_slice(&b[..n]);
                let mut at = 0;
                while got.len() - at >= FRAME_HEAD {
                    let head = FrameHead::parse(&got[at..at + FRAME_HEAD]);
                    if got.len() - at < FRAME_HEAD + head.len {
                        break;
                    }
                    let payload = &got[at + FRAME_HEAD..at + FRAME_HEAD + head.len];
                    at += FRAME_HEAD + head.len;
                    if head.stream != 1 {
                        continue;
                    }
                    if head.kind == 0x3 {
                        let code = u32::from_be_bytes(payload.try_into().expect("4 bytes"));
                        return Err(code);
                    }
                    if head.kind == HEADERS {
                        let fields = decoder.decode(payload).expect("server headers");
                        if let Some((_, v)) = fields.iter().find(|(n, _)| n == b"grpc-status") {
                            return Ok(String::from_utf8_lossy(v).into_owned());
                        }
                    }
                }
                got.drain(..at);
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect("an answer")
    }

    #[tokio::test]
    async fn the_http2_server_refuses_a_path_authority_and_takes_it_through_the_fix() {
        let path = "tmp%2Fcorral%2Fcorral.sock";
        // Without the fix: reset with PROTOCOL_ERROR (1), as grpc-core clients see it.
        assert_eq!(check_through(path, false).await, Err(1));
        assert_eq!(check_through(path, true).await, Ok("0".to_string()));
        // What the server takes anyway is served either way.
        assert_eq!(check_through("localhost", false).await, Ok("0".to_string()));
        assert_eq!(check_through("localhost", true).await, Ok("0".to_string()));
        assert_eq!(check_through("", true).await, Ok("0".to_string()));
    }
}
