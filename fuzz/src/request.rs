//! `nbd_request`: transmission request headers and their validation.
//!
//! Input: a 28-byte request header, then the export's geometry (size: u64,
//! minimum block: u32, maximum payload: u32, transmission flags: u16, all
//! little-endian) and a byte of switches: bit 0 writes the request magic
//! over the header (so that most inputs reach [`validate`]), bit 1 takes the
//! minimum block as given instead of a power of two up to 64 KiB, bit 2 the
//! maximum payload as given instead of 32 MiB. Inputs shorter than a header
//! check that [`parse_request`] reports them short.
//!
//! Properties: `parse_request` accepts exactly the headers with the request
//! magic and `encode_request` gives back the same 28 bytes; an accepted
//! request never reaches past the export's end (nor overflows), is aligned
//! to the minimum block, is within the maximum payload, uses only
//! advertised commands and flags, and never writes to a read-only export;
//! rejections carry a protocol error and a message. The reply encoders
//! refuse buffers that are too short and fill the documented layout
//! otherwise.

use hotcopy_export::nbd::proto::*;

use crate::Fields;

pub fn nbd_request(data: &[u8]) {
    if data.len() < REQUEST_LEN {
        assert_eq!(parse_request(data), Err(RequestError::Short(data.len())));
        return;
    }
    let (head, rest) = data.split_at(REQUEST_LEN);
    let mut f = Fields::new(rest);
    let (size, min_raw, max_raw, tflags, switches) = (f.u64(), f.u32(), f.u32(), f.u16(), f.u8());
    let mut header = [0u8; REQUEST_LEN];
    header.copy_from_slice(head);
    if switches & 1 != 0 {
        header[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    let g = Geometry {
        size,
        min_block: if switches & 2 != 0 {
            min_raw
        } else {
            1 << (min_raw % 17)
        },
        max_payload: if switches & 4 != 0 {
            max_raw
        } else {
            MAX_PAYLOAD
        },
        flags: tflags,
    };
    replies(header[8..16].try_into().unwrap_or_default(), switches);

    let magic = u32::from_be_bytes(header[..4].try_into().unwrap_or_default());
    let r = match parse_request(&header) {
        Ok(r) => r,
        Err(e) => {
            assert_ne!(magic, REQUEST_MAGIC, "{e}");
            assert_eq!(e, RequestError::BadMagic(magic));
            return;
        }
    };
    assert_eq!(magic, REQUEST_MAGIC);
    assert_eq!(encode_request(&r), header, "encode(parse(x)) == x");
    // Trailing bytes (the payload, the next request) are not the header's.
    let mut longer = header.to_vec();
    longer.extend_from_slice(rest);
    assert_eq!(parse_request(&longer), Ok(r));
    assert_eq!(
        payload_len(&r),
        if r.kind == CMD_WRITE { r.length } else { 0 }
    );

    match validate(&r, &g) {
        Ok(v) => accepted(&r, &g, &v),
        Err(rej) => {
            assert!(matches!(rej.errno, EINVAL | ENOSPC | EPERM), "{rej:?}");
            assert!(!rej.message.is_empty());
            // A WRITE whose payload the server will not read must be told
            // EINVAL: the connection then knows it cannot go on.
            if r.kind == CMD_WRITE && r.length > g.max_payload {
                assert_eq!(rej.errno, EINVAL, "{rej:?}");
            }
        }
    }
}

/// What must hold of a request `validate` accepted.
fn accepted(r: &Request, g: &Geometry, v: &Valid) {
    let cmd = match r.kind {
        CMD_READ => Command::Read,
        CMD_WRITE => Command::Write,
        CMD_DISC => Command::Disconnect,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim,
        CMD_WRITE_ZEROES => Command::WriteZeroes,
        k => panic!("accepted unknown command {k}"),
    };
    assert_eq!(v.cmd, cmd);
    let mutating = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    match cmd {
        Command::Disconnect | Command::Flush => {
            assert_eq!((v.offset, v.length, v.fua), (0, 0, false));
        }
        _ => {
            assert_eq!((v.offset, v.length), (r.offset, r.length));
            let end = v.offset.checked_add(u64::from(v.length));
            assert!(
                end.is_some_and(|e| e <= g.size),
                "accepted {} bytes at {} on a {}-byte export",
                v.length,
                v.offset,
                g.size
            );
            let min = u64::from(g.min_block.max(1));
            assert!(v.offset.is_multiple_of(min) && u64::from(v.length).is_multiple_of(min));
        }
    }
    if matches!(cmd, Command::Read | Command::Write) {
        assert!(v.length <= g.max_payload);
    }
    if mutating {
        assert_eq!(g.flags & FLAG_READ_ONLY, 0, "a write to a read-only export");
    }
    let advertised = |flag| g.flags & flag != 0;
    match cmd {
        Command::Flush => assert!(advertised(FLAG_SEND_FLUSH)),
        Command::Trim => assert!(advertised(FLAG_SEND_TRIM)),
        Command::WriteZeroes => assert!(advertised(FLAG_SEND_WRITE_ZEROES)),
        _ => {}
    }
    if cmd != Command::Disconnect {
        let mut allowed = 0;
        if advertised(FLAG_SEND_FUA) {
            allowed |= CMD_FLAG_FUA;
        }
        if cmd == Command::WriteZeroes {
            allowed |= CMD_FLAG_NO_HOLE;
        }
        assert_eq!(r.flags & !allowed, 0, "an unadvertised flag was accepted");
    }
    assert_eq!(v.fua, mutating && r.flags & CMD_FLAG_FUA != 0);
}

/// The reply encoders, into buffers of every length up to what they need.
fn replies(handle: [u8; 8], switches: u8) {
    let handle = u64::from_be_bytes(handle);
    let len = usize::from(switches >> 3) + 14; // 14..=45: around each layout's size
    let mut b = vec![0xa5u8; len];
    let fits = |need: usize, wrote: usize| {
        assert_eq!(wrote, if len >= need { need } else { 0 });
    };
    let done = switches & 8 != 0;
    fits(SIMPLE_REPLY_LEN, encode_simple_reply(&mut b, EIO, handle));
    if len >= SIMPLE_REPLY_LEN {
        assert_eq!(b[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(b[8..16], handle.to_be_bytes());
    }
    fits(
        CHUNK_HEADER_LEN,
        encode_chunk_header(&mut b, 1, REPLY_TYPE_NONE, handle, 7),
    );
    fits(
        CHUNK_HEADER_LEN + 8,
        encode_offset_data(&mut b, done, handle, 4096, u32::MAX),
    );
    if len >= CHUNK_HEADER_LEN + 8 {
        // The chunk length saturates rather than wrapping.
        assert_eq!(b[16..20], u32::MAX.to_be_bytes());
    }
    fits(
        CHUNK_HEADER_LEN + 6,
        encode_error_chunk(&mut b, done, handle, EINVAL, u16::MAX),
    );
    fits(
        CHUNK_HEADER_LEN + 14,
        encode_error_offset_chunk(&mut b, done, handle, EIO, 512),
    );
    fits(CHUNK_HEADER_LEN, encode_none_done(&mut b, handle));
}
