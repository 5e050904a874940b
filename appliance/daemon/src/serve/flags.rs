//! `hotcopy serve`'s shorthand flags, merged into the config:
//! `--bdev NAME=SPEC` is a `bdevs:` entry, `--nbd NAME@HOST:PORT` or
//! `--nbd NAME@unix:PATH` an `exports:` entry of bdev NAME (export name NAME),
//! `--rpc-socket PATH` overrides `rpc_socket:`.

use std::path::PathBuf;

use hotcopy_config::{Config, ConfigError, ExportConfig, Listen, NamedBdev};

/// `--bdev NAME=SPEC`.
pub fn parse_bdev_flag(s: &str) -> Result<NamedBdev, String> {
    let (name, spec) = s.split_once('=').ok_or_else(|| {
        format!("{s:?}: expected NAME=SPEC, e.g. vol0=cow:uring:/var/tmp/vol0.img@1G")
    })?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{s:?}: the bdev name before '=' is empty"));
    }
    let bdev = hotcopy_config::parse_spec(spec).map_err(|e| e.to_string())?;
    Ok(NamedBdev {
        name: name.to_string(),
        bdev,
    })
}

/// `--nbd NAME@HOST:PORT` or `--nbd NAME@unix:PATH`.
pub fn parse_nbd_flag(s: &str) -> Result<ExportConfig, String> {
    let (name, listen) = s.split_once('@').ok_or_else(|| {
        format!("{s:?}: expected NAME@HOST:PORT or NAME@unix:PATH, e.g. vol0@127.0.0.1:10809")
    })?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{s:?}: the bdev name before '@' is empty"));
    }
    let listen: Listen = listen.parse()?;
    Ok(ExportConfig {
        name: name.to_string(),
        bdev: name.to_string(),
        listen,
        read_only: false,
    })
}

/// Adds the flags to `cfg` and validates the result. Errors of the flags
/// name the flag; a clash with the file names both.
pub fn merge(
    mut cfg: Config,
    origin: &str,
    bdevs: Vec<NamedBdev>,
    exports: Vec<ExportConfig>,
    rpc_socket: Option<PathBuf>,
) -> Result<Config, String> {
    for b in bdevs {
        if cfg.bdev(&b.name).is_some() {
            return Err(format!(
                "--bdev {}: a bdev of that name is already defined (by {origin} or another --bdev)",
                b.name
            ));
        }
        cfg.bdevs.push(b);
    }
    cfg.exports.extend(exports);
    if rpc_socket.is_some() {
        cfg.rpc_socket = rpc_socket;
    }
    cfg.validate().map_err(|e: ConfigError| {
        // Errors from the flags have no line; say where the entries came from.
        format!(
            "{origin} with the command-line flags: {}: {}",
            e.field, e.message
        )
    })?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let b = parse_bdev_flag("vol0=cow:uring:/var/tmp/v.img@1G").unwrap();
        assert_eq!(b.name, "vol0");
        assert_eq!(b.bdev.type_name(), "cow");
        assert!(parse_bdev_flag("vol0").unwrap_err().contains("NAME=SPEC"));
        assert!(parse_bdev_flag("=malloc:1M").unwrap_err().contains("empty"));
        assert!(parse_bdev_flag("a=malloc:1X")
            .unwrap_err()
            .contains("invalid bdev spec"));

        let e = parse_nbd_flag("vol0@127.0.0.1:10809").unwrap();
        assert_eq!((e.name.as_str(), e.bdev.as_str()), ("vol0", "vol0"));
        assert_eq!(e.listen.to_string(), "127.0.0.1:10809");
        let e = parse_nbd_flag("vol0@unix:/tmp/n.sock").unwrap();
        assert_eq!(e.listen, Listen::Unix("/tmp/n.sock".into()));
        assert!(parse_nbd_flag("vol0")
            .unwrap_err()
            .contains("NAME@HOST:PORT"));
        assert!(parse_nbd_flag("vol0@10809")
            .unwrap_err()
            .contains("HOST:PORT"));
    }

    #[test]
    fn merge_checks_the_whole() {
        let cfg = Config::default();
        let b = parse_bdev_flag("v=malloc:1M").unwrap();
        let n = parse_nbd_flag("w@127.0.0.1:10809").unwrap();
        let e = merge(cfg.clone(), "the config", vec![b.clone()], vec![n], None).unwrap_err();
        assert!(e.contains("exports[0].bdev: unknown bdev \"w\""), "{e}");
        let e = merge(
            cfg.clone(),
            "x.yaml",
            vec![b.clone(), b.clone()],
            vec![],
            None,
        )
        .unwrap_err();
        assert!(e.contains("--bdev v"), "{e}");
        let ok = merge(
            cfg,
            "x.yaml",
            vec![b],
            vec![parse_nbd_flag("v@unix:/tmp/s").unwrap()],
            Some("/tmp/r.sock".into()),
        )
        .unwrap();
        assert_eq!(ok.exports.len(), 1);
        assert_eq!(
            ok.rpc_socket.as_deref(),
            Some(std::path::Path::new("/tmp/r.sock"))
        );
    }
}
