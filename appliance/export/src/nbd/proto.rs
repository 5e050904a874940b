//! The NBD wire format: constants, and pure, panic-free encoders and decoders
//! for the transmission phase.
//!
//! Values are taken from the protocol document (`doc/proto.md` of the NBD
//! project); every integer on the wire is big-endian. Nothing here touches a
//! socket, so each function can be fed arbitrary bytes (unit tests and fuzz
//! targets do).

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, sent by the server after `NBDMAGIC` and by the
/// client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured replies.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

// Error values (the protocol's own list; they equal Linux errno values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// The largest READ or WRITE payload the server accepts: 32 MiB, the size the
/// protocol document says no client should consider a denial of service and
/// the maximum that interoperable clients use.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// The preferred block size the server advertises (at least the bdev's block).
pub const PREFERRED_BLOCK: u32 = 4096;
/// The longest string (export name, description, message) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// A transmission request header, as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    /// The command (`CMD_*`); unknown values are kept for the error reply.
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request header could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request header needs {REQUEST_LEN} bytes, got {0}")]
    Short(usize),
    #[error("bad request magic {0:#010x} (expected {REQUEST_MAGIC:#010x})")]
    BadMagic(u32),
}

fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    be16(b, at)
}

pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    be32(b, at)
}

pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    be64(b, at)
}

/// Decodes the request header at the start of `b` (which may hold more).
pub fn parse_request(b: &[u8]) -> Result<Request, RequestError> {
    if b.len() < REQUEST_LEN {
        return Err(RequestError::Short(b.len()));
    }
    let magic = be32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(RequestError::BadMagic(magic));
    }
    Ok(Request {
        flags: be16(b, 4),
        kind: be16(b, 6),
        handle: be64(b, 8),
        offset: be64(b, 16),
        length: be32(b, 24),
    })
}

/// Encodes a request header (for clients and tests).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// Writes a simple reply header into `out[..16]`; returns 16.
pub fn encode_simple_reply(out: &mut [u8], error: u32, handle: u64) -> usize {
    if out.len() < SIMPLE_REPLY_LEN {
        return 0;
    }
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    SIMPLE_REPLY_LEN
}

/// Writes a structured reply chunk header into `out[..20]`; returns 20.
pub fn encode_chunk_header(out: &mut [u8], flags: u16, kind: u16, handle: u64, len: u32) -> usize {
    if out.len() < CHUNK_HEADER_LEN {
        return 0;
    }
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    CHUNK_HEADER_LEN
}

/// Writes the header and offset of an `OFFSET_DATA` chunk carrying `data_len`
/// bytes at `offset` into `out[..28]`; the data follows on the wire. Returns 28.
pub fn encode_offset_data(
    out: &mut [u8],
    done: bool,
    handle: u64,
    offset: u64,
    data_len: u32,
) -> usize {
    if out.len() < CHUNK_HEADER_LEN + 8 {
        return 0;
    }
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let n = encode_chunk_header(
        out,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        data_len.saturating_add(8),
    );
    out[n..n + 8].copy_from_slice(&offset.to_be_bytes());
    n + 8
}

/// Writes an `ERROR` chunk header and its fixed fields (error, message
/// length) into `out[..26]`; the `msg_len` message bytes follow on the wire.
/// Returns 26.
pub fn encode_error_chunk(
    out: &mut [u8],
    done: bool,
    handle: u64,
    error: u32,
    msg_len: u16,
) -> usize {
    if out.len() < CHUNK_HEADER_LEN + 6 {
        return 0;
    }
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let n = encode_chunk_header(out, flags, REPLY_TYPE_ERROR, handle, 6 + msg_len as u32);
    out[n..n + 4].copy_from_slice(&error.to_be_bytes());
    out[n + 4..n + 6].copy_from_slice(&msg_len.to_be_bytes());
    n + 6
}

/// Writes a complete `ERROR_OFFSET` chunk (no message) into `out[..34]`.
/// Returns 34.
pub fn encode_error_offset_chunk(
    out: &mut [u8],
    done: bool,
    handle: u64,
    error: u32,
    offset: u64,
) -> usize {
    if out.len() < CHUNK_HEADER_LEN + 14 {
        return 0;
    }
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let n = encode_chunk_header(out, flags, REPLY_TYPE_ERROR_OFFSET, handle, 14);
    out[n..n + 4].copy_from_slice(&error.to_be_bytes());
    out[n + 4..n + 6].copy_from_slice(&0u16.to_be_bytes());
    out[n + 6..n + 14].copy_from_slice(&offset.to_be_bytes());
    n + 14
}

/// Writes a `NONE` chunk with the `DONE` flag into `out[..20]`; returns 20.
pub fn encode_none_done(out: &mut [u8], handle: u64) -> usize {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)
}

/// Appends one option reply to `out`.
pub fn push_option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// What a transmission request asks for, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
}

/// What the server told the client about the export it is using: the facts
/// a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Export size in bytes.
    pub size: u64,
    /// Minimum block size (the bdev's block size): offsets and lengths must be
    /// multiples of it.
    pub min_block: u32,
    /// Largest READ/WRITE payload.
    pub max_payload: u32,
    /// The transmission flags sent to the client.
    pub flags: u16,
}

/// A request that passed [`validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Valid {
    pub cmd: Command,
    /// Force unit access: reply only once the data is durable.
    pub fua: bool,
    pub offset: u64,
    pub length: u32,
}

/// Why a request is refused: the NBD error to reply with, and a message for
/// structured replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub message: &'static str,
}

const fn reject(errno: u32, message: &'static str) -> Rejection {
    Rejection { errno, message }
}

/// Bytes of payload that follow a request header on the wire: only a WRITE
/// carries data, and it does whatever else is wrong with the request.
pub fn payload_len(r: &Request) -> u32 {
    if r.kind == CMD_WRITE {
        r.length
    } else {
        0
    }
}

/// Checks a request against the export it addresses. Pure: the error value
/// follows the protocol document (`EINVAL` for unknown commands and flags,
/// misalignment and oversize payloads, reads past the end; `ENOSPC` for
/// writes past the end; `EPERM` for writes to a read-only export).
pub fn validate(r: &Request, g: &Geometry) -> Result<Valid, Rejection> {
    let cmd = match r.kind {
        CMD_READ => Command::Read,
        CMD_WRITE => Command::Write,
        CMD_DISC => Command::Disconnect,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim,
        CMD_WRITE_ZEROES => Command::WriteZeroes,
        CMD_CACHE => return Err(reject(EINVAL, "NBD_CMD_CACHE is not supported")),
        CMD_BLOCK_STATUS => {
            return Err(reject(
                EINVAL,
                "NBD_CMD_BLOCK_STATUS needs a metadata context; none was negotiated",
            ))
        }
        _ => return Err(reject(EINVAL, "unknown command")),
    };
    if cmd == Command::Disconnect {
        return Ok(Valid {
            cmd,
            fua: false,
            offset: 0,
            length: 0,
        });
    }
    // A payload the server will not take is refused first, whatever else is
    // wrong, so that the caller knows the connection cannot continue.
    if matches!(cmd, Command::Read | Command::Write) && r.length > g.max_payload {
        return Err(reject(
            EINVAL,
            "request length exceeds the maximum block size",
        ));
    }
    let mutating = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if mutating && g.flags & FLAG_READ_ONLY != 0 {
        return Err(reject(EPERM, "the export is read-only"));
    }
    let mut allowed = 0u16;
    if g.flags & FLAG_SEND_FUA != 0 {
        allowed |= CMD_FLAG_FUA;
    }
    if cmd == Command::WriteZeroes {
        allowed |= CMD_FLAG_NO_HOLE;
    }
    if r.flags & !allowed != 0 {
        return Err(reject(EINVAL, "unsupported command flag"));
    }
    let advertised = match cmd {
        Command::Flush => g.flags & FLAG_SEND_FLUSH != 0,
        Command::Trim => g.flags & FLAG_SEND_TRIM != 0,
        Command::WriteZeroes => g.flags & FLAG_SEND_WRITE_ZEROES != 0,
        _ => true,
    };
    if !advertised {
        return Err(reject(EINVAL, "command not supported by this export"));
    }
    let fua = r.flags & CMD_FLAG_FUA != 0 && mutating;
    if cmd == Command::Flush {
        // Offset and length are reserved; the flush covers the whole export.
        return Ok(Valid {
            cmd,
            fua: false,
            offset: 0,
            length: 0,
        });
    }
    let min = g.min_block.max(1) as u64;
    if !r.offset.is_multiple_of(min) || !(r.length as u64).is_multiple_of(min) {
        return Err(reject(
            EINVAL,
            "offset or length not aligned to the minimum block size",
        ));
    }
    match r.offset.checked_add(r.length as u64) {
        Some(end) if end <= g.size => {}
        _ if mutating => return Err(reject(ENOSPC, "request beyond the end of the export")),
        _ => return Err(reject(EINVAL, "request beyond the end of the export")),
    }
    Ok(Valid {
        cmd,
        fua,
        offset: r.offset,
        length: r.length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        size: 1 << 20,
        min_block: 512,
        max_payload: MAX_PAYLOAD,
        flags: FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES,
    };

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            handle: 7,
            offset,
            length,
        }
    }

    #[test]
    fn request_round_trips_and_bad_magic_is_named() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let b = encode_request(&r);
        assert_eq!(parse_request(&b), Ok(r));
        assert_eq!(parse_request(&b[..27]), Err(RequestError::Short(27)));
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(
            parse_request(&bad),
            Err(RequestError::BadMagic(0x0060_9513))
        );
    }

    #[test]
    fn validation_follows_the_protocol_errors() {
        let ok = |r| validate(&r, &G).map(|v| v.cmd);
        let errno = |r| validate(&r, &G).map_err(|e| e.errno);
        assert_eq!(ok(req(CMD_READ, 0, 0, 4096)), Ok(Command::Read));
        assert_eq!(errno(req(CMD_READ, 0, 1 << 20, 512)), Err(EINVAL));
        assert_eq!(errno(req(CMD_WRITE, 0, (1 << 20) - 512, 1024)), Err(ENOSPC));
        assert_eq!(errno(req(CMD_READ, 0, 100, 512)), Err(EINVAL), "misaligned");
        assert_eq!(errno(req(CMD_READ, 0, 0, 100)), Err(EINVAL), "misaligned");
        assert_eq!(errno(req(CMD_READ, 0, 0, MAX_PAYLOAD + 512)), Err(EINVAL));
        assert_eq!(errno(req(CMD_READ, CMD_FLAG_DF, 0, 512)), Err(EINVAL));
        assert_eq!(errno(req(99, 0, 0, 0)), Err(EINVAL));
        assert_eq!(errno(req(CMD_BLOCK_STATUS, 0, 0, 512)), Err(EINVAL));
        assert_eq!(errno(req(CMD_READ, 0, u64::MAX - 511, 512)), Err(EINVAL));
        assert!(
            validate(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 512), &G)
                .unwrap()
                .fua
        );
        assert_eq!(
            ok(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20)),
            Ok(Command::WriteZeroes)
        );
        assert_eq!(ok(req(CMD_FLUSH, 0, 5, 7)), Ok(Command::Flush));
        assert_eq!(ok(req(CMD_DISC, 0xffff, 5, 7)), Ok(Command::Disconnect));
        let ro = Geometry {
            flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
            ..G
        };
        let e = validate(&req(CMD_WRITE, 0, 0, 512), &ro).unwrap_err();
        assert_eq!(e.errno, EPERM);
        let e = validate(&req(CMD_TRIM, 0, 0, 512), &ro).unwrap_err();
        assert_eq!(e.errno, EPERM);
        let e = validate(&req(CMD_FLUSH, 0, 0, 0), &ro).unwrap_err();
        assert_eq!(e.errno, EINVAL, "flush was not advertised");
    }

    #[test]
    fn reply_encoders_fill_the_documented_layouts() {
        let mut b = [0u8; 40];
        assert_eq!(encode_simple_reply(&mut b, EIO, 0x0102), 16);
        assert_eq!(&b[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5]);
        assert_eq!(encode_offset_data(&mut b, true, 9, 4096, 512), 28);
        assert_eq!(get_u16(&b, 4), REPLY_FLAG_DONE);
        assert_eq!(get_u16(&b, 6), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(get_u32(&b, 16), 520);
        assert_eq!(get_u64(&b, 20), 4096);
        assert_eq!(encode_error_offset_chunk(&mut b, false, 9, EIO, 512), 34);
        assert_eq!(get_u32(&b, 16), 14);
        assert_eq!(encode_error_chunk(&mut b, true, 9, EINVAL, 3), 26);
        assert_eq!(get_u32(&b, 16), 9);
        assert_eq!(
            encode_simple_reply(&mut b[..3], 0, 0),
            0,
            "short buffers are refused"
        );
    }

    proptest::proptest! {
        #[test]
        fn validation_never_panics_and_accepts_only_what_fits(
            flags: u16, kind: u16, handle: u64, offset: u64, length: u32,
            size: u64, min_shift in 0u32..17, tflags: u16,
        ) {
            let g = Geometry { size, min_block: 1 << min_shift, max_payload: MAX_PAYLOAD, flags: tflags };
            let r = Request { flags, kind, handle, offset, length };
            let b = encode_request(&r);
            proptest::prop_assert_eq!(parse_request(&b), Ok(r));
            if let Ok(v) = validate(&r, &g) {
                if matches!(v.cmd, Command::Read | Command::Write | Command::Trim | Command::WriteZeroes) {
                    proptest::prop_assert!(v.offset.checked_add(v.length as u64).is_some_and(|e| e <= size));
                    proptest::prop_assert!(v.offset % g.min_block as u64 == 0);
                }
                if v.cmd == Command::Write {
                    proptest::prop_assert!(tflags & FLAG_READ_ONLY == 0 && v.length <= MAX_PAYLOAD);
                }
            }
        }
    }
}
