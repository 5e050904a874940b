//! `nbd_handshake`: the fixed newstyle handshake state machine against an
//! independent model of the protocol.
//!
//! Input: byte 0 chooses how the rest is cut into the pieces handed to
//! [`Handshake::advance`] (all at once, one byte at a time, or random pieces
//! of up to 7 or 64 bytes, some of them empty); the rest is what the client
//! sends after the server's greeting.
//!
//! The model (`expect`) reads the same client stream the way the protocol
//! document describes it and predicts the outcome (more input needed, enter
//! transmission on an export, or close for a reason), how many bytes the
//! server consumes, and every reply: its option, its type, and its data
//! (exactly for `ACK`, `REP_SERVER` and `REP_INFO`; a UTF-8 message of at
//! most 4096 bytes for errors). The information replies of `INFO`/`GO` are
//! compared as a set, since the protocol does not fix their order. Also:
//! `NeedMore` means everything offered was consumed, an empty input changes
//! nothing, a finished handshake consumes nothing more, and the output stays
//! within a constant factor of the input.

use hotcopy_export::nbd::handshake::{
    CloseReason, ExportCatalog, ExportInfo, Handshake, StaticCatalog, Step, MAX_OPTION_DATA,
};
use hotcopy_export::nbd::proto::*;

use crate::Rng;

/// The exports the fuzzed server offers: a writable one (the default, with
/// a description) and a read-only one without a description.
pub(crate) fn catalog() -> StaticCatalog {
    StaticCatalog(vec![
        ExportInfo {
            name: "vol".into(),
            description: "a volume".into(),
            size: 1 << 20,
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN,
            min_block: 512,
            preferred_block: PREFERRED_BLOCK,
            max_block: MAX_PAYLOAD,
        },
        ExportInfo {
            name: "ro".into(),
            description: String::new(),
            size: 3 * 4096,
            flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
            min_block: 4096,
            preferred_block: 4096,
            max_block: 1 << 20,
        },
    ])
}

/// Output bytes allowed per consumed input byte, plus a constant: the
/// largest answer to a 16-byte option is a few replies of short fixed data.
const MAX_AMPLIFICATION: usize = 8;

pub fn nbd_handshake(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let cat = catalog();
    let mut pieces = Pieces::new(mode);
    let mut hs = Handshake::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut outcome = None;
    while at < stream.len() {
        let len = pieces.next().min(stream.len() - at);
        let piece = &stream[at..at + len];
        let before = out.len();
        let (used, step) = hs.advance(piece, &cat, &mut out);
        assert!(used <= len, "consumed {used} of {len} bytes");
        at += used;
        match step {
            Step::NeedMore => {
                assert_eq!(used, len, "NeedMore must consume all it was given");
                assert!(!hs.is_finished());
                if len == 0 {
                    assert_eq!(out.len(), before, "an empty input produced output");
                }
            }
            step => {
                assert!(hs.is_finished());
                outcome = Some(step);
                break;
            }
        }
        assert!(out.len() <= MAX_AMPLIFICATION * at + 256);
    }
    if let Some(step) = &outcome {
        // Once finished, nothing more is consumed or answered.
        let before = out.len();
        let (used, again) = hs.advance(&stream[at..], &cat, &mut out);
        assert_eq!((used, out.len()), (0, before));
        assert!(matches!(again, Step::NeedMore), "{step:?} then {again:?}");
    }

    let want = expect(stream, &cat);
    assert_eq!(at, want.consumed, "bytes consumed (model: {:?})", want.end);
    match (&outcome, &want.end) {
        (None, End::NeedMore) => {}
        (
            Some(Step::Go {
                export,
                info,
                structured,
            }),
            End::Go {
                export: e,
                structured: s,
            },
        ) => {
            assert_eq!((export, structured), (e, s));
            assert_eq!(Some(info), cat.0.get(*e));
        }
        (Some(Step::Close(reason)), End::Close(r)) => {
            assert_eq!(reason, r);
            assert_eq!(reason.is_protocol_error(), *r != CloseReason::Abort);
            assert!(!reason.to_string().is_empty());
        }
        (got, want) => panic!("outcome {got:?}, the model expects {want:?}"),
    }
    check_replies(&out, &want.replies);
}

/// Cuts the client stream into the pieces given to `advance`.
struct Pieces {
    rng: Rng,
    /// Largest piece; `None`: everything at once.
    max: Option<u64>,
}

impl Pieces {
    fn new(mode: u8) -> Pieces {
        let max = match mode & 3 {
            0 => None,
            1 => Some(1),
            2 => Some(7),
            _ => Some(64),
        };
        Pieces {
            rng: Rng::new(u64::from(mode >> 2)),
            max,
        }
    }

    /// The length of the next piece (0 now and then: an empty read).
    fn next(&mut self) -> usize {
        match self.max {
            None => usize::MAX,
            Some(1) => 1,
            Some(max) => self.rng.below(max + 1) as usize,
        }
    }
}

/// How the model says the handshake ends.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    NeedMore,
    Go { export: usize, structured: bool },
    Close(CloseReason),
}

/// One reply the model expects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// An option reply with exactly this data.
    Exact {
        option: u32,
        kind: u32,
        data: Vec<u8>,
    },
    /// An error reply: any short UTF-8 message.
    Error { option: u32, kind: u32 },
    /// `REP_INFO` replies with these data, in any order.
    Infos { option: u32, infos: Vec<Vec<u8>> },
    /// Raw bytes (the old-style `EXPORT_NAME` reply).
    Raw(Vec<u8>),
}

#[derive(Debug)]
struct Expected {
    replies: Vec<Reply>,
    end: End,
    consumed: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// The model: reads the whole client stream as the protocol describes it.
fn expect(s: &[u8], cat: &StaticCatalog) -> Expected {
    let mut replies = Vec::new();
    let done = |replies, end, consumed| Expected {
        replies,
        end,
        consumed,
    };
    if s.len() < 4 {
        return done(replies, End::NeedMore, s.len());
    }
    let flags = be32(s, 0);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return done(replies, End::Close(CloseReason::BadClientFlags(flags)), 4);
    }
    let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut at = 4;
    loop {
        if s.len() - at < 16 {
            return done(replies, End::NeedMore, s.len());
        }
        let (magic, option, len) = (be64(s, at), be32(s, at + 8), be32(s, at + 12));
        at += 16;
        if magic != IHAVEOPT {
            return done(replies, End::Close(CloseReason::BadOptionMagic(magic)), at);
        }
        if len > MAX_OPTION_DATA && option == OPT_EXPORT_NAME {
            return done(replies, End::Close(CloseReason::ExportNameTooLong(len)), at);
        }
        if ((s.len() - at) as u64) < u64::from(len) {
            return done(replies, End::NeedMore, s.len());
        }
        let data = &s[at..at + len as usize];
        at += len as usize;
        if len > MAX_OPTION_DATA {
            replies.push(Reply::Error {
                option,
                kind: REP_ERR_TOO_BIG,
            });
            continue;
        }
        let ack = Reply::Exact {
            option,
            kind: REP_ACK,
            data: Vec::new(),
        };
        let error = |kind| Reply::Error { option, kind };
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
                let Some((export, info)) = cat.find(&name) else {
                    let end = End::Close(CloseReason::UnknownExport(name.into_owned()));
                    return done(replies, end, at);
                };
                let mut raw = info.size.to_be_bytes().to_vec();
                raw.extend_from_slice(&info.flags.to_be_bytes());
                if !no_zeroes {
                    raw.extend_from_slice(&[0u8; 124]);
                }
                replies.push(Reply::Raw(raw));
                return done(replies, End::Go { export, structured }, at);
            }
            OPT_ABORT => {
                replies.push(ack);
                return done(replies, End::Close(CloseReason::Abort), at);
            }
            OPT_LIST if !data.is_empty() => replies.push(error(REP_ERR_INVALID)),
            OPT_LIST => {
                for e in &cat.0 {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    replies.push(Reply::Exact {
                        option,
                        kind: REP_SERVER,
                        data: d,
                    });
                }
                replies.push(ack);
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => replies.push(error(REP_ERR_INVALID)),
            OPT_STRUCTURED_REPLY => {
                structured = true;
                replies.push(ack);
            }
            OPT_INFO | OPT_GO => match info_request(data) {
                None => replies.push(error(REP_ERR_INVALID)),
                Some((name, wanted)) => match cat.find(&name) {
                    None => replies.push(error(REP_ERR_UNKNOWN)),
                    Some((export, info)) => {
                        replies.push(Reply::Infos {
                            option,
                            infos: infos(&info, &wanted),
                        });
                        replies.push(ack);
                        if option == OPT_GO {
                            return done(replies, End::Go { export, structured }, at);
                        }
                    }
                },
            },
            // Everything else, STARTTLS included, is unsupported.
            _ => replies.push(error(REP_ERR_UNSUP)),
        }
    }
}

/// The export name and information types of `NBD_OPT_INFO`/`GO` data, or
/// `None` when the data is malformed.
fn info_request(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = usize::try_from(be32(d.get(..4)?, 0)).ok()?;
    let name = d.get(4..4usize.checked_add(name_len)?)?;
    let rest = &d[4 + name_len..];
    let count = usize::from(be16(rest.get(..2)?, 0));
    if rest.len() != 2 + 2 * count {
        return None;
    }
    let wanted = (0..count).map(|i| be16(rest, 2 + 2 * i)).collect();
    Some((String::from_utf8_lossy(name).into_owned(), wanted))
}

/// The `REP_INFO` data the server owes for `info`, given the requested types:
/// `INFO_EXPORT` and `INFO_BLOCK_SIZE` always, `INFO_NAME` when asked,
/// `INFO_DESCRIPTION` when asked and there is one.
fn infos(info: &ExportInfo, wanted: &[u16]) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&info.size.to_be_bytes());
    export.extend_from_slice(&info.flags.to_be_bytes());
    v.push(export);
    let mut block = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [info.min_block, info.preferred_block, info.max_block] {
        block.extend_from_slice(&x.to_be_bytes());
    }
    v.push(block);
    if wanted.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(info.name.as_bytes());
        v.push(d);
    }
    if wanted.contains(&INFO_DESCRIPTION) && !info.description.is_empty() {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(info.description.as_bytes());
        v.push(d);
    }
    v.sort();
    v
}

/// Splits off one option reply: (option, type, data).
fn take_reply<'a>(out: &mut &'a [u8]) -> (u32, u32, &'a [u8]) {
    assert!(out.len() >= 20, "a cut-short option reply: {out:?}");
    assert_eq!(be64(out, 0), OPT_REPLY_MAGIC, "option reply magic");
    let (option, kind, len) = (be32(out, 8), be32(out, 12), be32(out, 16) as usize);
    assert!(out.len() - 20 >= len, "option reply data cut short");
    let data = &out[20..20 + len];
    *out = &out[20 + len..];
    (option, kind, data)
}

/// Checks the server's output against the model's replies.
fn check_replies(mut out: &[u8], want: &[Reply]) {
    for w in want {
        match w {
            Reply::Raw(raw) => {
                assert_eq!(out, &raw[..], "old-style export reply");
                out = &[];
            }
            Reply::Exact { option, kind, data } => {
                let got = take_reply(&mut out);
                assert_eq!(got, (*option, *kind, &data[..]));
            }
            Reply::Error { option, kind } => {
                let (o, k, msg) = take_reply(&mut out);
                assert_eq!((o, k), (*option, *kind), "error reply");
                assert!(msg.len() <= MAX_STRING, "a {}-byte message", msg.len());
                assert!(std::str::from_utf8(msg).is_ok(), "message not UTF-8");
            }
            Reply::Infos { option, infos } => {
                let mut got = Vec::new();
                while out.len() >= 20 && be32(out, 12) == REP_INFO {
                    let (o, _, d) = take_reply(&mut out);
                    assert_eq!(o, *option);
                    got.push(d.to_vec());
                }
                got.sort();
                assert_eq!(&got, infos, "REP_INFO replies");
            }
        }
    }
    assert!(out.is_empty(), "{} unexpected output bytes", out.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model agrees with the seeds' intent (the check compares the
    /// server with the model, so the model must not be trivially wrong).
    #[test]
    fn model_on_known_sessions() {
        let cat = catalog();
        let seeds = crate::seeds::all();
        let seed = |name: &str| {
            let s = seeds
                .iter()
                .find(|s| s.target == "nbd_handshake" && s.name == name)
                .expect("seed");
            expect(&s.bytes[1..], &cat)
        };
        let go = seed("go-session");
        assert_eq!(
            go.end,
            End::Go {
                export: 0,
                structured: true
            }
        );
        assert_eq!(go.replies.len(), 10, "{:?}", go.replies);
        assert!(matches!(
            seed("export-name-old-style").end,
            End::Go {
                export: 1,
                structured: false
            }
        ));
        assert_eq!(
            seed("info-errors-then-abort").end,
            End::Close(CloseReason::Abort)
        );
        assert_eq!(
            seed("oversize-option").end,
            End::Go {
                export: 0,
                structured: false
            }
        );
        assert!(matches!(
            seed("bad-option-magic").end,
            End::Close(CloseReason::BadOptionMagic(_))
        ));
    }
}
