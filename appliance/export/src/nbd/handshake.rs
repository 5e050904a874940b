//! The fixed newstyle handshake as a pure state machine over bytes.
//!
//! [`Handshake::advance`] takes whatever bytes the client has sent so far
//! (any split: one byte at a time or everything at once), consumes what it
//! can, appends the server's replies to an output buffer, and says what
//! happens next ([`Step`]). It never panics and never blocks, and what it
//! buffers is bounded: option data up to [`MAX_OPTION_DATA`] bytes; longer
//! options are skipped as they stream past and refused with
//! `NBD_REP_ERR_TOO_BIG`. That makes it directly fuzzable.
//!
//! Exchange (server first):
//!
//! ```text
//! S: "NBDMAGIC" "IHAVEOPT" flags:u16 (FIXED_NEWSTYLE | NO_ZEROES)     -- greeting()
//! C: client flags:u32 (FIXED_NEWSTYLE, NO_ZEROES; anything else: drop)
//! C: "IHAVEOPT" option:u32 length:u32 data[length]                    -- repeated
//! S: reply magic option:u32 type:u32 length:u32 data[length]          -- per option
//! ```
//!
//! Options: `EXPORT_NAME` (ends the handshake with the old-style reply, or a
//! hard disconnect for an unknown export, as the protocol requires), `ABORT`
//! (ACK, then close), `LIST` (one `REP_SERVER` with name and description per
//! export, then ACK), `INFO`/`GO` (`INFO_EXPORT`, `INFO_BLOCK_SIZE` always,
//! `INFO_NAME` and `INFO_DESCRIPTION` on request, then ACK; `GO` then enters
//! transmission), `STRUCTURED_REPLY` (ACK). Everything else, including TLS,
//! metadata contexts and extended headers, gets `NBD_REP_ERR_UNSUP`.

use super::proto::{self, get_u16, get_u32, get_u64};

/// Bytes of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Option data the state machine buffers. An `NBD_OPT_GO` with a name of the
/// protocol's maximum string length (4096 bytes) and every information type
/// fits many times over; longer options are skipped unread.
pub const MAX_OPTION_DATA: u32 = 16 * 1024;

/// The greeting the server sends as soon as a client connects.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// What a client learns about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

/// The exports a handshake can choose from.
pub trait ExportCatalog {
    /// What the connection keeps of the chosen export.
    type Export;
    /// The export named `name`; the empty name selects the default export.
    fn find(&self, name: &str) -> Option<(Self::Export, ExportInfo)>;
    /// Every export's name and description, in listing order.
    fn list(&self) -> Vec<(String, String)>;
}

/// Why the handshake ends without entering transmission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client set flags the server does not know.
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    BadOptionMagic(u64),
    /// `NBD_OPT_ABORT`: the client asked to end the session (ACK was sent).
    Abort,
    /// `NBD_OPT_EXPORT_NAME` named no export; the protocol's only answer is
    /// to drop the connection.
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` with a name longer than [`MAX_OPTION_DATA`].
    ExportNameTooLong(u32),
}

impl CloseReason {
    /// Whether the client broke the protocol (as opposed to leaving).
    pub fn is_protocol_error(&self) -> bool {
        !matches!(self, CloseReason::Abort)
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::BadClientFlags(x) => write!(f, "unknown client flags {x:#x}"),
            CloseReason::BadOptionMagic(m) => {
                write!(f, "bad option magic {m:#018x} (expected IHAVEOPT)")
            }
            CloseReason::Abort => write!(f, "client sent NBD_OPT_ABORT"),
            CloseReason::UnknownExport(n) => write!(f, "NBD_OPT_EXPORT_NAME: no export {n:?}"),
            CloseReason::ExportNameTooLong(n) => {
                write!(f, "NBD_OPT_EXPORT_NAME with a {n}-byte name")
            }
        }
    }
}

/// What [`Handshake::advance`] decided.
#[derive(Debug)]
pub enum Step<E> {
    /// Everything given was consumed (or is buffered); send the output and
    /// feed more input.
    NeedMore,
    /// Enter transmission on `export` once the output is sent. Bytes after
    /// the consumed ones belong to the transmission phase.
    Go {
        export: E,
        info: ExportInfo,
        structured: bool,
    },
    /// Send the output, then close the connection.
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, len: u32 },
    Skip { option: u32, left: u32 },
    Finished,
}

/// The server side of one client's handshake. See the module docs.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    /// Header bytes collected so far (client flags or an option header).
    head: [u8; 16],
    head_len: usize,
    data: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    /// A handshake waiting for the client flags (send [`greeting`] first).
    pub fn new() -> Self {
        Handshake {
            state: State::ClientFlags,
            head: [0; 16],
            head_len: 0,
            data: Vec::new(),
            no_zeroes: false,
            structured: false,
        }
    }

    /// Whether the client negotiated structured replies so far.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// Whether the handshake ended (with `Go` or `Close`).
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Collects header bytes up to `want`; returns whether they are complete.
    fn gather(&mut self, input: &[u8], used: &mut usize, want: usize) -> bool {
        let take = (want - self.head_len).min(input.len() - *used);
        self.head[self.head_len..self.head_len + take].copy_from_slice(&input[*used..*used + take]);
        self.head_len += take;
        *used += take;
        self.head_len == want
    }

    /// Consumes a prefix of `input`, appends replies to `out`. Returns how
    /// many bytes were consumed and what to do next.
    pub fn advance<C: ExportCatalog>(
        &mut self,
        input: &[u8],
        catalog: &C,
        out: &mut Vec<u8>,
    ) -> (usize, Step<C::Export>) {
        let mut used = 0;
        loop {
            match self.state {
                State::Finished => return (used, Step::NeedMore),
                State::ClientFlags => {
                    if !self.gather(input, &mut used, 4) {
                        return (used, Step::NeedMore);
                    }
                    self.head_len = 0;
                    let flags = get_u32(&self.head, 0);
                    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
                    if flags & !known != 0 {
                        self.state = State::Finished;
                        return (used, Step::Close(CloseReason::BadClientFlags(flags)));
                    }
                    // A client without FIXED_NEWSTYLE is still answered in
                    // fixed newstyle (the protocol allows it): old clients
                    // only ever send EXPORT_NAME, which has no option reply.
                    self.no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    if !self.gather(input, &mut used, 16) {
                        return (used, Step::NeedMore);
                    }
                    self.head_len = 0;
                    let magic = get_u64(&self.head, 0);
                    if magic != proto::IHAVEOPT {
                        self.state = State::Finished;
                        return (used, Step::Close(CloseReason::BadOptionMagic(magic)));
                    }
                    let option = get_u32(&self.head, 8);
                    let len = get_u32(&self.head, 12);
                    if len > MAX_OPTION_DATA {
                        if option == proto::OPT_EXPORT_NAME {
                            self.state = State::Finished;
                            return (used, Step::Close(CloseReason::ExportNameTooLong(len)));
                        }
                        self.state = State::Skip { option, left: len };
                    } else {
                        self.data.clear();
                        self.state = State::OptionData { option, len };
                    }
                }
                State::Skip { option, left } => {
                    let take = (left as usize).min(input.len() - used);
                    used += take;
                    let left = left - take as u32;
                    if left > 0 {
                        self.state = State::Skip { option, left };
                        return (used, Step::NeedMore);
                    }
                    proto::push_option_reply(
                        out,
                        option,
                        proto::REP_ERR_TOO_BIG,
                        b"option data too long",
                    );
                    self.state = State::OptionHeader;
                }
                State::OptionData { option, len } => {
                    let take = (len as usize - self.data.len()).min(input.len() - used);
                    self.data.extend_from_slice(&input[used..used + take]);
                    used += take;
                    if self.data.len() < len as usize {
                        return (used, Step::NeedMore);
                    }
                    self.state = State::OptionHeader;
                    if let Some(step) = self.option(option, catalog, out) {
                        self.state = State::Finished;
                        return (used, step);
                    }
                }
            }
        }
    }

    /// Handles one complete option; `Some` ends the handshake.
    fn option<C: ExportCatalog>(
        &mut self,
        option: u32,
        catalog: &C,
        out: &mut Vec<u8>,
    ) -> Option<Step<C::Export>> {
        let data = std::mem::take(&mut self.data);
        let step = self.option_inner(option, &data, catalog, out);
        self.data = data;
        step
    }

    fn option_inner<C: ExportCatalog>(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &C,
        out: &mut Vec<u8>,
    ) -> Option<Step<C::Export>> {
        let reply = |out: &mut Vec<u8>, kind: u32, msg: &[u8]| {
            proto::push_option_reply(out, option, kind, msg)
        };
        match option {
            proto::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                let Some((export, info)) = catalog.find(&name) else {
                    return Some(Step::Close(CloseReason::UnknownExport(name)));
                };
                out.extend_from_slice(&info.size.to_be_bytes());
                out.extend_from_slice(&info.flags.to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Some(Step::Go {
                    export,
                    info,
                    structured: self.structured,
                })
            }
            proto::OPT_ABORT => {
                // Any data is ignored, as the protocol asks.
                reply(out, proto::REP_ACK, &[]);
                Some(Step::Close(CloseReason::Abort))
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    reply(out, proto::REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return None;
                }
                for (name, description) in catalog.list() {
                    let mut d = Vec::with_capacity(4 + name.len() + description.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    d.extend_from_slice(description.as_bytes());
                    reply(out, proto::REP_SERVER, &d);
                }
                reply(out, proto::REP_ACK, &[]);
                None
            }
            proto::OPT_INFO | proto::OPT_GO => self.info_or_go(option, data, catalog, out),
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        out,
                        proto::REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured = true;
                    reply(out, proto::REP_ACK, &[]);
                }
                None
            }
            proto::OPT_STARTTLS => {
                reply(
                    out,
                    proto::REP_ERR_UNSUP,
                    b"TLS is not supported by this server",
                );
                None
            }
            _ => {
                let msg = format!("option {option} is not supported by this server");
                reply(out, proto::REP_ERR_UNSUP, msg.as_bytes());
                None
            }
        }
    }

    fn info_or_go<C: ExportCatalog>(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &C,
        out: &mut Vec<u8>,
    ) -> Option<Step<C::Export>> {
        let invalid = |out: &mut Vec<u8>, msg: &str| {
            proto::push_option_reply(out, option, proto::REP_ERR_INVALID, msg.as_bytes());
            None
        };
        if data.len() < 6 {
            return invalid(out, "NBD_OPT_INFO/GO data shorter than 6 bytes");
        }
        let name_len = get_u32(data, 0) as usize;
        let Some(after_name) = name_len.checked_add(4).filter(|&e| e + 2 <= data.len()) else {
            return invalid(out, "export name length exceeds the option data");
        };
        let requests = get_u16(data, after_name) as usize;
        if after_name + 2 + 2 * requests != data.len() {
            return invalid(
                out,
                "information request count does not match the option length",
            );
        }
        let name = String::from_utf8_lossy(&data[4..after_name]).into_owned();
        let wants = |t: u16| (0..requests).any(|i| get_u16(data, after_name + 2 + 2 * i) == t);
        let Some((export, info)) = catalog.find(&name) else {
            let shown: String = name.chars().take(256).collect();
            let msg = format!("no export named {shown:?}");
            proto::push_option_reply(out, option, proto::REP_ERR_UNKNOWN, msg.as_bytes());
            return None;
        };
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&info.size.to_be_bytes());
        d.extend_from_slice(&info.flags.to_be_bytes());
        proto::push_option_reply(out, option, proto::REP_INFO, &d);
        if wants(proto::INFO_NAME) {
            d.clear();
            d.extend_from_slice(&proto::INFO_NAME.to_be_bytes());
            d.extend_from_slice(info.name.as_bytes());
            proto::push_option_reply(out, option, proto::REP_INFO, &d);
        }
        if wants(proto::INFO_DESCRIPTION) && !info.description.is_empty() {
            d.clear();
            d.extend_from_slice(&proto::INFO_DESCRIPTION.to_be_bytes());
            d.extend_from_slice(info.description.as_bytes());
            proto::push_option_reply(out, option, proto::REP_INFO, &d);
        }
        // Sent whether or not it was asked for: the server enforces a
        // minimum block size above the protocol's default of 1.
        d.clear();
        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&info.min_block.to_be_bytes());
        d.extend_from_slice(&info.preferred_block.to_be_bytes());
        d.extend_from_slice(&info.max_block.to_be_bytes());
        proto::push_option_reply(out, option, proto::REP_INFO, &d);
        proto::push_option_reply(out, option, proto::REP_ACK, &[]);
        if option == proto::OPT_GO {
            Some(Step::Go {
                export,
                info,
                structured: self.structured,
            })
        } else {
            None
        }
    }
}

/// A fixed list of exports, for tests and fuzzing.
#[derive(Debug, Clone, Default)]
pub struct StaticCatalog(pub Vec<ExportInfo>);

impl ExportCatalog for StaticCatalog {
    type Export = usize;

    fn find(&self, name: &str) -> Option<(usize, ExportInfo)> {
        if name.is_empty() {
            return self.0.first().map(|e| (0, e.clone()));
        }
        self.0
            .iter()
            .position(|e| e.name == name)
            .map(|i| (i, self.0[i].clone()))
    }

    fn list(&self) -> Vec<(String, String)> {
        self.0
            .iter()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::*;

    fn catalog() -> StaticCatalog {
        StaticCatalog(vec![ExportInfo {
            name: "vol".into(),
            description: "a volume".into(),
            size: 1 << 20,
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
            min_block: 512,
            preferred_block: 4096,
            max_block: MAX_PAYLOAD,
        }])
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Splits option replies: (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while b.len() >= 20 {
            assert_eq!(get_u64(b, 0), OPT_REPLY_MAGIC);
            let len = get_u32(b, 16) as usize;
            v.push((get_u32(b, 8), get_u32(b, 12), b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        assert!(b.is_empty(), "trailing bytes");
        v
    }

    #[test]
    fn go_with_structured_replies_one_byte_at_a_time() {
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(99, b"junk"));
        input.extend(option(
            OPT_GO,
            &go_data("vol", &[INFO_BLOCK_SIZE, INFO_NAME]),
        ));
        input.extend_from_slice(b"tail");
        let (cat, mut hs, mut out) = (catalog(), Handshake::new(), Vec::new());
        let mut at = 0;
        let go = loop {
            let (used, step) = hs.advance(&input[at..at + 1], &cat, &mut out);
            at += used;
            match step {
                Step::NeedMore => assert_eq!(used, 1),
                Step::Go {
                    export, structured, ..
                } => break (export, structured),
                Step::Close(r) => panic!("closed: {r}"),
            }
        };
        assert_eq!(go, (0, true));
        assert_eq!(&input[at..], b"tail", "bytes after GO are left alone");
        let r = replies(&out);
        assert_eq!((r[0].0, r[0].1), (OPT_STRUCTURED_REPLY, REP_ACK));
        assert_eq!((r[1].0, r[1].1), (99, REP_ERR_UNSUP));
        assert_eq!(r[2].1, REP_INFO);
        assert_eq!(get_u16(&r[2].2, 0), INFO_EXPORT);
        assert_eq!(get_u64(&r[2].2, 2), 1 << 20);
        assert_eq!(&r[3].2[2..], b"vol");
        assert_eq!(get_u16(&r[4].2, 0), INFO_BLOCK_SIZE);
        assert_eq!(get_u32(&r[4].2, 2), 512);
        assert_eq!(r.last().unwrap().1, REP_ACK);
    }

    #[test]
    fn list_info_unknown_and_abort() {
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(option(OPT_LIST, &[]));
        input.extend(option(OPT_LIST, b"x"));
        input.extend(option(OPT_INFO, &go_data("nope", &[])));
        input.extend(option(OPT_INFO, &[0, 0, 0, 9, 0]));
        input.extend(option(OPT_ABORT, &[]));
        let (mut hs, mut out) = (Handshake::new(), Vec::new());
        let (used, step) = hs.advance(&input, &catalog(), &mut out);
        assert_eq!(used, input.len());
        assert!(matches!(step, Step::Close(CloseReason::Abort)));
        let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            kinds,
            [
                REP_SERVER,
                REP_ACK,
                REP_ERR_INVALID,
                REP_ERR_UNKNOWN,
                REP_ERR_INVALID,
                REP_ACK
            ]
        );
        let server = &replies(&out)[0].2;
        assert_eq!(&server[4..], b"vola volume", "name, then description");
    }

    #[test]
    fn export_name_old_reply_and_hard_failures() {
        let cat = catalog();
        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend(option(OPT_EXPORT_NAME, b""));
        let (mut hs, mut out) = (Handshake::new(), Vec::new());
        let (_, step) = hs.advance(&input, &cat, &mut out);
        assert!(
            matches!(step, Step::Go { export: 0, .. }),
            "empty name: default export"
        );
        assert_eq!(out.len(), 8 + 2 + 124, "zeroes without NO_ZEROES");

        let mut input = 0u32.to_be_bytes().to_vec();
        input.extend(option(OPT_EXPORT_NAME, b"other"));
        let (_, step) = Handshake::new().advance(&input, &cat, &mut Vec::new());
        assert!(matches!(step, Step::Close(CloseReason::UnknownExport(n)) if n == "other"));

        let (_, step) = Handshake::new().advance(&[0, 0, 0, 4], &cat, &mut Vec::new());
        assert!(matches!(step, Step::Close(CloseReason::BadClientFlags(4))));

        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend_from_slice(b"GARBAGE!GARBAGE!");
        let (_, step) = Handshake::new().advance(&input, &cat, &mut Vec::new());
        assert!(matches!(step, Step::Close(CloseReason::BadOptionMagic(_))));
    }

    #[test]
    fn oversize_options_are_skipped_without_buffering() {
        let mut input = 1u32.to_be_bytes().to_vec();
        let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&OPT_LIST.to_be_bytes());
        hdr.extend_from_slice(&(1u32 << 20).to_be_bytes());
        input.extend(hdr);
        let (mut hs, mut out) = (Handshake::new(), Vec::new());
        let cat = catalog();
        hs.advance(&input, &cat, &mut out);
        let chunk = vec![0xa5u8; 64 * 1024];
        for _ in 0..16 {
            let (used, step) = hs.advance(&chunk, &cat, &mut out);
            assert_eq!(used, chunk.len());
            assert!(matches!(step, Step::NeedMore));
        }
        assert!(hs.data.capacity() <= MAX_OPTION_DATA as usize);
        assert_eq!(replies(&out)[0].1, REP_ERR_TOO_BIG);
        let (_, step) = hs.advance(&option(OPT_GO, &go_data("vol", &[])), &cat, &mut out);
        assert!(matches!(step, Step::Go { .. }), "the session goes on");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_input_never_panics(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..32),
            prefix in 0u8..3,
        ) {
            let cat = catalog();
            let mut hs = Handshake::new();
            let mut out = Vec::new();
            let mut stream: Vec<u8> = Vec::new();
            // Sometimes start with a valid prefix so deeper states are reached.
            if prefix > 0 {
                stream.extend_from_slice(&1u32.to_be_bytes());
            }
            if prefix > 1 {
                stream.extend_from_slice(&IHAVEOPT.to_be_bytes());
            }
            for c in &chunks {
                stream.extend_from_slice(c);
            }
            let mut at = 0;
            for c in &chunks {
                let end = (at + c.len()).min(stream.len());
                let (used, step) = hs.advance(&stream[at..end], &cat, &mut out);
                proptest::prop_assert!(used <= end - at);
                at += used;
                if !matches!(step, Step::NeedMore) {
                    break;
                }
            }
            proptest::prop_assert!(out.len() < 64 * 1024);
        }
    }
}
