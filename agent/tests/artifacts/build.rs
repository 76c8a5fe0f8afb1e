//! Archives the tests build themselves, hostile ones included: raw tar headers let a test
//! write names (`../x`, `/etc/passwd`) a well-behaved builder would refuse.

use std::io::Write;

use sha2::{Digest as _, Sha256};

/// One tar entry.
pub enum E<'a> {
    File(&'a [u8], &'a [u8], u32),
    Dir(&'a [u8], u32),
    Symlink(&'a [u8], &'a [u8]),
    HardLink(&'a [u8], &'a [u8]),
    CharDev(&'a [u8]),
    Fifo(&'a [u8]),
}

fn header(name: &[u8], kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    assert!(name.len() < 100, "raw names up to 99 bytes");
    let old = h.as_old_mut();
    old.name = [0; 100];
    old.name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

/// A tar of the entries, names written as given.
pub fn tar(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            E::File(name, data, mode) => {
                let h = header(name, tar::EntryType::Regular, data.len() as u64, *mode);
                b.append(&h, *data).expect("append");
            }
            E::Dir(name, mode) => {
                let h = header(name, tar::EntryType::Directory, 0, *mode);
                b.append(&h, &[][..]).expect("append");
            }
            E::Symlink(name, target) | E::HardLink(name, target) => {
                let kind = if matches!(e, E::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                };
                let mut h = header(name, kind, 0, 0o777);
                h.set_link_name_literal(target).expect("link name");
                h.set_cksum();
                b.append(&h, &[][..]).expect("append");
            }
            E::CharDev(name) => {
                let mut h = header(name, tar::EntryType::Char, 0, 0o666);
                h.set_device_major(1).expect("major");
                h.set_device_minor(3).expect("minor");
                h.set_cksum();
                b.append(&h, &[][..]).expect("append");
            }
            E::Fifo(name) => {
                let h = header(name, tar::EntryType::Fifo, 0, 0o644);
                b.append(&h, &[][..]).expect("append");
            }
        }
    }
    b.into_inner().expect("finish")
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// gzip at its best ratio (about 1000:1 on zeros).
pub fn gzip_best(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 1).expect("zstd")
}

pub fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A zip of (name, content, unix mode); mode with S_IFLNK makes a symlink.
pub fn zip(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data, mode) in entries {
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(*mode);
        if mode & 0o170000 == 0o120000 {
            w.add_symlink(*name, String::from_utf8_lossy(data), options)
                .expect("symlink");
        } else if name.ends_with('/') {
            w.add_directory(*name, options).expect("dir");
        } else {
            w.start_file(*name, options).expect("file");
            w.write_all(data).expect("write");
        }
    }
    w.finish().expect("zip").into_inner()
}
