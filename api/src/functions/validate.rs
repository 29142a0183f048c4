//! Validation of code packages before they are stored. Runs on the blocking pool over the
//! spooled file.
//!
//! - `wasm` (`application/wasm`): a valid core WebAssembly module (wasmparser's validator with
//!   its default features) that exports a function `_start` and imports only functions of
//!   `wasi_snapshot_preview1` — WASI preview 1, nothing else the host would have to provide.
//! - `process` (`application/zip`, or `application/gzip` holding a tar archive): the archive
//!   opens, no member escapes the package directory (no absolute paths, no `..`), and the
//!   function's entry is a regular file in it, executable when the archive records modes.

use std::{
    io::Read,
    path::{Component, Path},
};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;

/// The WASI preview 1 import module.
pub const WASI_P1: &str = "wasi_snapshot_preview1";
/// Most members an archive may have.
pub const MAX_ARCHIVE_MEMBERS: usize = 10_000;
/// Most bytes a tarball may unpack to (guards against compression bombs).
pub const MAX_UNPACKED_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// How a package is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Format {
    /// A WebAssembly module (`application/wasm`).
    #[serde(rename = "wasm")]
    Wasm,
    /// A zip archive (`application/zip`).
    #[serde(rename = "zip")]
    Zip,
    /// A gzip-compressed tar archive (`application/gzip`).
    #[serde(rename = "tar.gz")]
    TarGz,
}

impl Format {
    /// The format of a request's media type, if it is one of ours.
    pub fn from_media_type(content_type: &str) -> Option<Format> {
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/wasm" => Some(Format::Wasm),
            "application/zip" => Some(Format::Zip),
            "application/gzip" | "application/x-gzip" => Some(Format::TarGz),
            _ => None,
        }
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Wasm => "wasm",
            Format::Zip => "zip",
            Format::TarGz => "tar.gz",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> anyhow::Result<Format> {
        match s {
            "wasm" => Ok(Format::Wasm),
            "zip" => Ok(Format::Zip),
            "tar.gz" => Ok(Format::TarGz),
            other => Err(anyhow::anyhow!("unknown package format {other:?} in the database")),
        }
    }
}

impl TryFrom<String> for Format {
    type Error = anyhow::Error;
    fn try_from(s: String) -> anyhow::Result<Format> {
        Format::parse(&s)
    }
}

fn invalid(field: &str, rule: &str, message: impl Into<String>) -> Vec<FieldError> {
    vec![FieldError::new(field, rule, message)]
}

/// Validates the package at `path`: a wasm module when `entry` is `None`, else an archive
/// holding `entry`. Every problem is named (`package`, `package.imports[i]`, `package.entry`).
pub fn validate(path: &Path, format: Format, entry: Option<&str>) -> Result<(), Vec<FieldError>> {
    let io_error = |e: std::io::Error| invalid("package", "unreadable", format!("reading the package: {e}"));
    match (format, entry) {
        (Format::Wasm, None) => validate_wasm(&std::fs::read(path).map_err(io_error)?),
        (Format::Zip, Some(entry)) => validate_zip(std::fs::File::open(path).map_err(io_error)?, entry),
        (Format::TarGz, Some(entry)) => validate_tar_gz(std::fs::File::open(path).map_err(io_error)?, entry),
        (Format::Wasm, Some(_)) => Err(invalid(
            "content-type",
            "runtime_mismatch",
            "process functions take application/zip or application/gzip",
        )),
        (_, None) => Err(invalid("content-type", "runtime_mismatch", "wasm functions take application/wasm")),
    }
}

/// Validates a WebAssembly module against the WASI preview 1 contract.
pub fn validate_wasm(bytes: &[u8]) -> Result<(), Vec<FieldError>> {
    use wasmparser::{Encoding, ExternalKind, Parser, Payload, TypeRef, Validator, WasmFeatures};

    // Decided on the header, before the validator (whose component support depends on features
    // other crates of the build enable).
    if bytes.starts_with(b"\0asm") && bytes.get(4..8) != Some(&[1, 0, 0, 0]) {
        return Err(invalid(
            "package",
            "wasm_component",
            "a WebAssembly component (or an unknown version); Nimbus runs core modules (WASI preview 1)",
        ));
    }
    let mut validator = Validator::new_with_features(WasmFeatures::default());
    if let Err(e) = validator.validate_all(bytes) {
        return Err(invalid("package", "wasm_invalid", format!("not a valid WebAssembly module: {e}")));
    }
    let mut errors = Vec::new();
    let mut has_start = false;
    let mut imports_wasi = false;
    let mut exports_memory = false;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = match payload {
            Ok(p) => p,
            Err(e) => return Err(invalid("package", "wasm_invalid", format!("not a valid WebAssembly module: {e}"))),
        };
        match payload {
            Payload::Version { encoding: Encoding::Component, .. } => {
                return Err(invalid("package", "wasm_component", "a WebAssembly component; Nimbus runs core modules"));
            }
            Payload::ImportSection(reader) => {
                for (i, import) in reader.into_imports().enumerate() {
                    let Ok(import) = import else { continue };
                    imports_wasi |= import.module == WASI_P1;
                    if import.module != WASI_P1 {
                        errors.push(FieldError::new(
                            format!("package.imports[{i}]"),
                            "wasi_preview1_only",
                            format!(
                                "imports {}.{}; only functions of {WASI_P1} may be imported",
                                import.module, import.name
                            ),
                        ));
                    } else if !matches!(import.ty, TypeRef::Func(_) | TypeRef::FuncExact(_)) {
                        errors.push(FieldError::new(
                            format!("package.imports[{i}]"),
                            "wasi_preview1_only",
                            format!(
                                "imports {}.{} as a non-function; only functions may be imported",
                                import.module, import.name
                            ),
                        ));
                    }
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader.into_iter().flatten() {
                    has_start |= export.name == "_start" && export.kind == ExternalKind::Func;
                    exports_memory |= export.name == "memory" && export.kind == ExternalKind::Memory;
                }
            }
            _ => {}
        }
    }
    if !has_start {
        errors.push(FieldError::new("package.exports", "start_required", "the module must export a function `_start`"));
    }
    if imports_wasi && !exports_memory {
        errors.push(FieldError::new(
            "package.exports",
            "memory_required",
            "a module calling WASI must export its memory as `memory`",
        ));
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

/// Whether an archive member's path stays inside the package directory.
fn safe_member(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn normalized(path: &Path) -> String {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn check_entry(found: Option<(bool, Option<u32>)>, entry: &str) -> Result<(), Vec<FieldError>> {
    match found {
        None => Err(invalid(
            "package.entry",
            "entry_missing",
            format!("the archive has no file {entry:?} (the function's entry)"),
        )),
        Some((false, _)) => Err(invalid("package.entry", "entry_not_file", format!("{entry:?} is not a regular file"))),
        Some((true, Some(mode))) if mode & 0o111 == 0 => Err(invalid(
            "package.entry",
            "entry_not_executable",
            format!("{entry:?} is not executable (mode {mode:o})"),
        )),
        Some(_) => Ok(()),
    }
}

fn validate_zip(file: std::fs::File, entry: &str) -> Result<(), Vec<FieldError>> {
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| invalid("package", "archive_invalid", format!("not a readable zip archive: {e}")))?;
    if archive.len() > MAX_ARCHIVE_MEMBERS {
        return Err(invalid("package", "too_many_members", format!("at most {MAX_ARCHIVE_MEMBERS} archive members")));
    }
    let want = normalized(Path::new(entry));
    let mut found = None;
    for i in 0..archive.len() {
        let member = archive
            .by_index_raw(i)
            .map_err(|e| invalid("package", "archive_invalid", format!("member {i} unreadable: {e}")))?;
        let name = member
            .name()
            .map_err(|e| invalid("package", "archive_invalid", format!("member {i} has an unreadable name: {e}")))?
            .into_owned();
        let path = Path::new(&name);
        if !safe_member(path) {
            return Err(invalid("package", "unsafe_path", format!("member {name:?} leaves the package directory")));
        }
        // A link's target is in its (possibly compressed) data; links are refused outright.
        if member.is_symlink() {
            return Err(invalid("package", "link_not_allowed", format!("member {name:?} is a symbolic link")));
        }
        if normalized(path) == want {
            found = Some((member.is_file(), member.unix_mode()));
        }
    }
    check_entry(found, entry)
}

fn validate_tar_gz(file: std::fs::File, entry: &str) -> Result<(), Vec<FieldError>> {
    tar_gz_within(file, entry, MAX_UNPACKED_BYTES)
}

fn tar_gz_within(file: std::fs::File, entry: &str, cap: u64) -> Result<(), Vec<FieldError>> {
    let gz = flate2::read::GzDecoder::new(std::io::BufReader::new(file));
    // One byte over the cap tells a bomb from an archive that fills it exactly.
    let mut archive = tar::Archive::new(gz.take(cap + 1));
    let bad =
        |e: std::io::Error| invalid("package", "archive_invalid", format!("not a readable gzip tar archive: {e}"));
    let want = normalized(Path::new(entry));
    let mut scan = || -> Result<Option<(bool, Option<u32>)>, Vec<FieldError>> {
        let mut found = None;
        for (i, member) in archive.entries().map_err(bad)?.enumerate() {
            if i >= MAX_ARCHIVE_MEMBERS {
                return Err(invalid(
                    "package",
                    "too_many_members",
                    format!("at most {MAX_ARCHIVE_MEMBERS} archive members"),
                ));
            }
            let member = member.map_err(bad)?;
            let path = member.path().map_err(bad)?.into_owned();
            if !safe_member(&path) {
                return Err(invalid(
                    "package",
                    "unsafe_path",
                    format!("member {:?} leaves the package directory", path.display()),
                ));
            }
            let kind = member.header().entry_type();
            if kind.is_symlink() || kind.is_hard_link() {
                // A link may only point inside the package, relative to where it is.
                let target = member.link_name().map_err(bad)?.unwrap_or_default().into_owned();
                let base = path.parent().unwrap_or(Path::new(""));
                if target.is_absolute() || !stays_inside(&base.join(&target)) {
                    return Err(invalid(
                        "package",
                        "unsafe_path",
                        format!("link {:?} points outside the package ({})", path.display(), target.display()),
                    ));
                }
            }
            if normalized(&path) == want {
                found = Some((kind.is_file(), member.header().mode().ok()));
            }
        }
        Ok(found)
    };
    let scanned = scan();
    // Reaching the cap ends the stream early, cleanly or in the middle of a member: either way
    // the archive is too large, and what came after the cap was never looked at.
    if archive.into_inner().limit() == 0 {
        return Err(invalid("package", "too_large_unpacked", format!("the archive unpacks to more than {cap} bytes")));
    }
    check_entry(scanned?, entry)
}

/// Whether a relative path, with `..` resolved lexically, stays inside its root.
fn stays_inside(path: &Path) -> bool {
    let mut depth = 0i64;
    for c in path.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
    }

    fn rules(r: Result<(), Vec<FieldError>>) -> Vec<(String, String)> {
        r.unwrap_err().into_iter().map(|e| (e.field, e.rule)).collect()
    }

    #[test]
    fn a_wasi_command_is_accepted() {
        let ok = wasm(
            r#"(module
                 (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                 (memory (export "memory") 1)
                 (func (export "_start")))"#,
        );
        assert_eq!(validate_wasm(&ok), Ok(()));
    }

    #[test]
    fn wasm_without_start_or_with_foreign_imports_is_refused_naming_each_problem() {
        let bad = wasm(
            r#"(module
                 (import "env" "host_call" (func))
                 (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                 (import "wasi_snapshot_preview1" "mem" (memory 1))
                 (func (export "main")))"#,
        );
        assert_eq!(
            rules(validate_wasm(&bad)),
            vec![
                ("package.imports[0]".into(), "wasi_preview1_only".into()),
                ("package.imports[2]".into(), "wasi_preview1_only".into()),
                ("package.exports".into(), "start_required".into()),
                ("package.exports".into(), "memory_required".into()),
            ]
        );
        // `_start` exported as something other than a function does not count.
        let global = wasm(r#"(module (global (export "_start") i32 (i32.const 0)))"#);
        assert_eq!(rules(validate_wasm(&global)), vec![("package.exports".into(), "start_required".into())]);
    }

    #[test]
    fn garbage_and_broken_modules_are_refused() {
        assert_eq!(rules(validate_wasm(b"not wasm at all")), vec![("package".into(), "wasm_invalid".into())]);
        let mut truncated = wasm(r#"(module (func (export "_start")))"#);
        truncated.truncate(truncated.len() - 3);
        assert_eq!(rules(validate_wasm(&truncated)), vec![("package".into(), "wasm_invalid".into())]);
        // Type error inside a function body: parses, but does not validate.
        let ill_typed = wasm(r#"(module (func (export "_start") (drop (i32.add (i32.const 1) (f64.const 2)))))"#);
        assert_eq!(rules(validate_wasm(&ill_typed)), vec![("package".into(), "wasm_invalid".into())]);
        let component = b"\0asm\x0d\0\x01\0";
        assert_eq!(rules(validate_wasm(component)), vec![("package".into(), "wasm_component".into())]);
    }

    fn tar_gz(members: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (path, mode, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(*mode);
            header.set_entry_type(tar::EntryType::Regular);
            // `append_data` refuses `..`; write the raw name to test hostile archives too.
            header.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    fn tar_with_link(link: &str, target: &str) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_mode(0o755);
        builder.append_data(&mut header, "bin/handler", &b"x"[..]).unwrap();
        let mut link_header = tar::Header::new_gnu();
        link_header.set_entry_type(tar::EntryType::Symlink);
        link_header.set_size(0);
        builder.append_link(&mut link_header, link, target).unwrap();
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn tar_links_must_stay_inside_the_package() {
        let check = |bytes: Vec<u8>| {
            let path = std::env::temp_dir().join(format!("nimbus-tgz-{}", uuid::Uuid::now_v7().simple()));
            std::fs::write(&path, bytes).unwrap();
            let r = validate(&path, Format::TarGz, Some("bin/handler"));
            let _ = std::fs::remove_file(path);
            r
        };
        assert_eq!(check(tar_with_link("lib/current", "../bin/handler")), Ok(()));
        for target in ["/etc/passwd", "../../etc", "../.."] {
            assert_eq!(
                rules(check(tar_with_link("lib/x", target))),
                vec![("package".into(), "unsafe_path".into())],
                "{target}"
            );
        }
    }

    #[test]
    fn tarballs_unpacking_beyond_the_cap_are_refused_even_when_members_fit_exactly() {
        let bytes = tar_gz(&[("bin/handler", 0o755, &[0u8; 4096]), ("../late", 0o755, b"x")]);
        let path = std::env::temp_dir().join(format!("nimbus-tgz-{}", uuid::Uuid::now_v7().simple()));
        std::fs::write(&path, bytes).unwrap();
        // The cap ends inside the first member: neither the size nor the late member slips by.
        let r = tar_gz_within(std::fs::File::open(&path).unwrap(), "bin/handler", 4096);
        assert_eq!(rules(r), vec![("package".into(), "too_large_unpacked".into())]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn zip_symlinks_are_refused() {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        w.add_symlink("lib", "/", options).unwrap();
        let bytes = w.finish().unwrap().into_inner();
        assert_eq!(rules(check_zip(&bytes, "handler")), vec![("package".into(), "link_not_allowed".into())]);
    }

    #[test]
    fn paths_resolve_lexically() {
        assert!(stays_inside(Path::new("a/../b")));
        assert!(stays_inside(Path::new("a/b/../../c")));
        assert!(!stays_inside(Path::new("a/../../c")));
        assert!(!stays_inside(Path::new("/etc")));
    }

    fn check_tar(members: &[(&str, u32, &[u8])], entry: &str) -> Result<(), Vec<FieldError>> {
        let path = std::env::temp_dir().join(format!("nimbus-tgz-{}", uuid::Uuid::now_v7().simple()));
        std::fs::write(&path, tar_gz(members)).unwrap();
        let r = validate(&path, Format::TarGz, Some(entry));
        let _ = std::fs::remove_file(path);
        r
    }

    #[test]
    fn tarballs_must_hold_the_executable_entry_and_stay_inside() {
        assert_eq!(check_tar(&[("bin/handler", 0o755, b"#!/bin/sh\n")], "bin/handler"), Ok(()));
        assert_eq!(check_tar(&[("./bin/handler", 0o755, b"x")], "bin/handler"), Ok(()));
        assert_eq!(
            rules(check_tar(&[("bin/other", 0o755, b"x")], "bin/handler")),
            vec![("package.entry".into(), "entry_missing".into())]
        );
        assert_eq!(
            rules(check_tar(&[("bin/handler", 0o644, b"x")], "bin/handler")),
            vec![("package.entry".into(), "entry_not_executable".into())]
        );
        assert_eq!(
            rules(check_tar(&[("../escape", 0o755, b"x"), ("bin/handler", 0o755, b"x")], "bin/handler")),
            vec![("package".into(), "unsafe_path".into())]
        );
        let path = std::env::temp_dir().join(format!("nimbus-tgz-{}", uuid::Uuid::now_v7().simple()));
        std::fs::write(&path, b"\x1f\x8b garbage").unwrap();
        assert_eq!(
            rules(validate(&path, Format::TarGz, Some("x"))),
            vec![("package".into(), "archive_invalid".into())]
        );
        let _ = std::fs::remove_file(path);
    }

    fn zip(members: &[(&str, u32)]) -> Vec<u8> {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, mode) in members {
            let options = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored)
                .unix_permissions(*mode);
            w.start_file(*name, options).unwrap();
            w.write_all(b"#!/bin/sh\necho hi\n").unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn check_zip(bytes: &[u8], entry: &str) -> Result<(), Vec<FieldError>> {
        let path = std::env::temp_dir().join(format!("nimbus-zip-{}", uuid::Uuid::now_v7().simple()));
        std::fs::write(&path, bytes).unwrap();
        let r = validate(&path, Format::Zip, Some(entry));
        let _ = std::fs::remove_file(path);
        r
    }

    #[test]
    fn zips_must_hold_the_executable_entry_and_stay_inside() {
        assert_eq!(check_zip(&zip(&[("handler", 0o755)]), "handler"), Ok(()));
        assert_eq!(
            rules(check_zip(&zip(&[("handler", 0o644)]), "handler")),
            vec![("package.entry".into(), "entry_not_executable".into())]
        );
        assert_eq!(
            rules(check_zip(&zip(&[("lib/x", 0o755)]), "handler")),
            vec![("package.entry".into(), "entry_missing".into())]
        );
        assert_eq!(
            rules(check_zip(&zip(&[("/etc/cron.d/x", 0o755), ("handler", 0o755)]), "handler")),
            vec![("package".into(), "unsafe_path".into())]
        );
        assert_eq!(
            rules(check_zip(b"PK\x05\x06 not really", "handler")),
            vec![("package".into(), "archive_invalid".into())]
        );
    }

    #[test]
    fn entry_must_match_the_runtime() {
        let path = std::env::temp_dir().join(format!("nimbus-zip-{}", uuid::Uuid::now_v7().simple()));
        std::fs::write(&path, b"PK\x05\x06 not really").unwrap();
        assert_eq!(rules(validate(&path, Format::Zip, None)), vec![("content-type".into(), "runtime_mismatch".into())]);
        assert_eq!(
            rules(validate(&path, Format::Wasm, Some("handler"))),
            vec![("content-type".into(), "runtime_mismatch".into())]
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn media_types_map_to_formats() {
        assert_eq!(Format::from_media_type("application/wasm"), Some(Format::Wasm));
        assert_eq!(Format::from_media_type("Application/Zip; charset=binary"), Some(Format::Zip));
        assert_eq!(Format::from_media_type("application/gzip"), Some(Format::TarGz));
        assert_eq!(Format::from_media_type("application/json"), None);
    }
}
