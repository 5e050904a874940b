//! Shared rig for the NBD tests: a runtime with two reactors, malloc bdevs
//! with known content, a server on an ephemeral TCP port and a Unix socket,
//! and a raw, blocking protocol client for the bad-input tests.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use hotcopy_bdev::modules::malloc;
use hotcopy_bdev::testing;
use hotcopy_bdev::{BdevDesc, BdevRegistry};
use hotcopy_export::nbd::proto::*;
use hotcopy_export::{Listen, NbdConfig, NbdExport, NbdOptions, NbdServer};
use hotcopy_runtime::{IdlePolicy, Runtime, RuntimeConfig};

/// Size of the main export.
pub const SIZE: u64 = 64 << 20;
/// Seed of the main export's initial content.
pub const SEED: u64 = 0x5eed;

pub struct Rig {
    pub server: Option<NbdServer>,
    pub reg: BdevRegistry,
    pub desc: BdevDesc,
    pub rt: Option<Runtime>,
    pub dir: tempfile::TempDir,
    pub unix: PathBuf,
    pub addr: SocketAddr,
}

/// A scratch directory on disk (tmpfs refuses O_DIRECT), as the workspace
/// tests use.
pub fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("HOTCOPY_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    tempfile::Builder::new()
        .prefix("hotcopy-nbd-")
        .tempdir_in(base)
        .expect("scratch dir")
}

impl Rig {
    /// Exports: `vol` (64 MiB, 512-byte blocks, pattern content), `ro` (the
    /// same bdev, read-only), `k4` (8 MiB, 4096-byte blocks, zeroes).
    pub fn start() -> Rig {
        Self::start_with(NbdOptions::default())
    }

    pub fn start_with(opts: NbdOptions) -> Rig {
        let rt = Runtime::start(RuntimeConfig::with_cores(2, IdlePolicy::SLEEP)).unwrap();
        let reg = BdevRegistry::new();
        malloc::create(&reg, "vol", SIZE, 512).unwrap();
        malloc::create(&reg, "k4", 8 << 20, 4096).unwrap();
        let desc = reg.open("vol", true).unwrap();
        fill(&rt, &desc, 0, &testing::pattern(SEED, SIZE as usize));
        let dir = scratch();
        let unix = dir.path().join("nbd.sock");
        let cfg = NbdConfig {
            listen: vec![
                Listen::Tcp("127.0.0.1:0".parse().unwrap()),
                Listen::Unix(unix.clone()),
            ],
            exports: vec![
                NbdExport {
                    name: "vol".into(),
                    bdev: "vol".into(),
                    read_only: false,
                    description: "the test volume".into(),
                },
                NbdExport {
                    name: "ro".into(),
                    bdev: "vol".into(),
                    read_only: true,
                    description: String::new(),
                },
                NbdExport {
                    name: "k4".into(),
                    bdev: "k4".into(),
                    read_only: false,
                    description: "4K blocks".into(),
                },
            ],
        };
        let server = NbdServer::start_with(&rt, &reg, cfg, opts).unwrap();
        let addr = server.tcp_addr().unwrap();
        Rig {
            server: Some(server),
            reg,
            desc,
            rt: Some(rt),
            dir,
            unix,
            addr,
        }
    }

    pub fn server(&self) -> &NbdServer {
        self.server.as_ref().unwrap()
    }

    pub fn rt(&self) -> &Runtime {
        self.rt.as_ref().unwrap()
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix.display())
    }

    /// The bytes of bdev `vol` at `[offset, offset + len)`.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        read(self.rt(), &self.desc, offset, len)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown();
        }
    }
}

/// Writes `data` at byte `offset` of the bdev, 1 MiB at a time, on reactor 0.
pub fn fill(rt: &Runtime, desc: &BdevDesc, offset: u64, data: &[u8]) {
    let bs = desc.bdev().block_size() as u64;
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        let (desc, chunk) = (desc.clone(), chunk.to_vec());
        let at = (offset + (i as u64) * (1 << 20)) / bs;
        let st = rt
            .exec(0, move || {
                let mut ch = desc.channel().unwrap();
                testing::write(&mut ch, at, &chunk)
            })
            .unwrap();
        assert!(st.is_success(), "fill: {st:?}");
    }
}

/// Reads `len` bytes at byte `offset` of the bdev on reactor 0.
pub fn read(rt: &Runtime, desc: &BdevDesc, offset: u64, len: usize) -> Vec<u8> {
    let bs = desc.bdev().block_size() as u64;
    let mut out = Vec::with_capacity(len);
    let mut at = offset;
    while out.len() < len {
        let n = (len - out.len()).min(1 << 20);
        let desc = desc.clone();
        let (b, nb) = (at / bs, n as u64 / bs);
        let got = rt
            .exec(0, move || {
                let mut ch = desc.channel().unwrap();
                testing::read(&mut ch, b, nb).unwrap()
            })
            .unwrap();
        out.extend_from_slice(&got);
        at += n as u64;
    }
    out
}

/// Runs a command, returning (success, stdout + stderr).
pub fn run(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Whether a client program is installed (tests that need it fail loudly
/// when it is not: CI installs them).
pub fn require(tool: &str) {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed (apt-get install qemu-utils libnbd-bin fio)"
    );
}

// ---- a raw protocol client -------------------------------------------------

pub struct Raw {
    pub s: TcpStream,
}

pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub payload: Vec<u8>,
}

impl Raw {
    /// Connects and checks the greeting.
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = Raw { s };
        let g = r.take(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            3,
            "FIXED_NEWSTYLE | NO_ZEROES"
        );
        r
    }

    /// Connects, sends client flags and `NBD_OPT_GO` for `name`; returns
    /// (size, transmission flags).
    pub fn go(addr: SocketAddr, name: &str, structured: bool) -> (Raw, u64, u16) {
        let mut r = Raw::connect(addr);
        r.put(&3u32.to_be_bytes());
        if structured {
            r.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r.opt_reply().kind, REP_ACK);
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        r.option(OPT_GO, &d);
        let (mut size, mut flags) = (0, 0);
        loop {
            let rep = r.opt_reply();
            assert_eq!(rep.option, OPT_GO);
            match rep.kind {
                REP_INFO => {
                    let t = u16::from_be_bytes([rep.data[0], rep.data[1]]);
                    if t == INFO_EXPORT {
                        size = u64::from_be_bytes(rep.data[2..10].try_into().unwrap());
                        flags = u16::from_be_bytes([rep.data[10], rep.data[11]]);
                    }
                }
                REP_ACK => break,
                k => panic!(
                    "GO {name}: reply {k:#x}: {}",
                    String::from_utf8_lossy(&rep.data)
                ),
            }
        }
        (r, size, flags)
    }

    pub fn put(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.put(&b);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let h = self.take(20);
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        OptReply {
            option: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            kind: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data: self.take(len),
        }
    }

    pub fn request(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            kind,
            handle,
            offset,
            length,
        };
        self.put(&encode_request(&r));
    }

    /// A simple reply header: (error, handle).
    pub fn simple(&mut self) -> (u32, u64) {
        let h = self.take(16);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    pub fn chunk(&mut self) -> Chunk {
        let h = self.take(20);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        Chunk {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            payload: self.take(len),
        }
    }

    /// A read with a simple reply; returns the data or the error.
    pub fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, handle, offset, len);
        let (err, h) = self.simple();
        assert_eq!(h, handle);
        if err != 0 {
            return Err(err);
        }
        Ok(self.take(len as usize))
    }

    /// A write with a simple reply; returns the error (0: success).
    pub fn write(&mut self, handle: u64, flags: u16, offset: u64, data: &[u8]) -> u32 {
        self.request(CMD_WRITE, flags, handle, offset, data.len() as u32);
        self.put(data);
        let (err, h) = self.simple();
        assert_eq!(h, handle);
        err
    }

    /// Whether the server closed the connection (EOF or reset) within the
    /// read timeout, after any bytes still to come.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    return matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    )
                }
            }
        }
    }
}
