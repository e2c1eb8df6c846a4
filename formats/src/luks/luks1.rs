//! LUKS1: the 592-byte header, and the checks qemu makes on it before it opens a volume.
//!
//! qemu opens a LUKS1 header in two steps, both before it asks for a key and both also run by
//! `qemu-img info` (crypto/block-luks.c, `qcrypto_block_luks_open`): the layout check
//! (`qcrypto_block_luks_check_header`: NUL-terminated names, iteration counts, key-slot
//! states and stripes, key material that overlaps neither the header, the payload nor another
//! slot) and the algorithm lookup (`qcrypto_block_luks_parse_header`: cipher name and key
//! size, cipher mode, IV generator and its hash, PBKDF2 hash). A header that fails either
//! cannot be opened by qemu, so glimpse refuses it too (`luks.header`).
//!
//! A few headers pass both steps and still cannot be opened with their key; those are refused
//! as well, and each such check says so where it is made.

use nom::bytes::complete::take;
use nom::combinator::map_res;
use nom::number::complete::{be_u16, be_u32};
use nom::{IResult, Parser};

use crate::error::Result;

use super::header_error;

/// Bytes of the LUKS1 header, key slots included.
pub(super) const HEADER_LEN: u64 = 592;
/// LUKS1 sector size: the payload and key material offsets count 512-byte sectors.
pub(super) const SECTOR: u64 = 512;

// Byte offsets of the header fields (LUKS1 on-disk format 1.2, "phdr"), for error offsets.
const CIPHER_NAME_AT: u64 = 8;
const CIPHER_MODE_AT: u64 = 40;
const HASH_SPEC_AT: u64 = 72;
const PAYLOAD_OFFSET_AT: u64 = 104;
const KEY_BYTES_AT: u64 = 108;
const MK_ITERATIONS_AT: u64 = 164;
/// The first key slot; each is 48 bytes: active, iterations, salt[32], key offset, stripes.
const SLOTS_AT: u64 = 208;
const SLOT_LEN: u64 = 48;
const SLOT_ITERATIONS_AT: u64 = 4;
const SLOT_KEY_OFFSET_AT: u64 = 40;
const SLOT_STRIPES_AT: u64 = 44;

/// Number of key slots (LUKS1 spec; crypto/block-luks.c `QCRYPTO_BLOCK_LUKS_NUM_KEY_SLOTS`).
const SLOTS: usize = 8;
/// Key slot state "active" (LUKS1 spec `LUKS_KEY_ENABLED`; qemu's `..._KEY_SLOT_ENABLED`).
pub(super) const SLOT_ENABLED: u32 = 0x00AC_71F3;
/// Key slot state "inactive" (LUKS1 spec `LUKS_KEY_DISABLED`; qemu's `..._KEY_SLOT_DISABLED`).
const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// Anti-forensic stripes: qemu writes 4000 and refuses any other count in any slot,
/// enabled or not (crypto/block-luks.c `QCRYPTO_BLOCK_LUKS_STRIPES`, check_header).
const STRIPES: u32 = 4000;
/// Sectors before the first key material: qemu's `QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET` (4096
/// bytes) in 512-byte sectors. Neither key material nor the payload may start below it, and
/// each slot's key material is rounded up to a multiple of it.
const HEADER_SECTORS: u64 = 4096 / SECTOR;

/// One key slot, integers as stored (big-endian on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct KeySlot {
    /// `SLOT_ENABLED` or `SLOT_DISABLED`; anything else is corrupt.
    pub(super) active: u32,
    /// PBKDF2 iterations for this slot's passphrase.
    pub(super) iterations: u32,
    /// Start of this slot's key material, in 512-byte sectors.
    pub(super) key_offset: u32,
    /// Anti-forensic stripes of the key material.
    pub(super) stripes: u32,
}

/// The LUKS1 header (LUKS1 on-disk format, all integers big-endian).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Luks1 {
    /// Cipher name, e.g. "aes" (32 bytes, NUL-terminated).
    pub(super) cipher_name: [u8; 32],
    /// Cipher mode and IV generator, e.g. "xts-plain64" or "cbc-essiv:sha256" (32 bytes,
    /// NUL-terminated).
    pub(super) cipher_mode: [u8; 32],
    /// Hash for PBKDF2 and the anti-forensic splitter, e.g. "sha256" (32 bytes).
    pub(super) hash_spec: [u8; 32],
    /// Start of the bulk data, in 512-byte sectors.
    pub(super) payload_offset: u32,
    /// Master key length in bytes (both halves for XTS).
    pub(super) key_bytes: u32,
    /// PBKDF2 iterations for the master key digest.
    pub(super) mk_iterations: u32,
    /// Volume UUID (40 bytes, NUL-padded text).
    pub(super) uuid: [u8; 40],
    /// The eight key slots.
    pub(super) slots: [KeySlot; SLOTS],
}

fn array<const N: usize>(i: &[u8]) -> IResult<&[u8], [u8; N]> {
    map_res(take(N), <[u8; N]>::try_from).parse(i)
}

fn key_slot(i: &[u8]) -> IResult<&[u8], KeySlot> {
    let (i, active) = be_u32(i)?;
    let (i, iterations) = be_u32(i)?;
    let (i, _salt) = take(32usize)(i)?;
    let (i, key_offset) = be_u32(i)?;
    let (i, stripes) = be_u32(i)?;
    Ok((
        i,
        KeySlot {
            active,
            iterations,
            key_offset,
            stripes,
        },
    ))
}

/// Parses the 592-byte header (magic and version already checked by the caller).
pub(super) fn parse(i: &[u8]) -> IResult<&[u8], Luks1> {
    let (i, _magic) = take(6usize)(i)?;
    let (i, _version) = be_u16(i)?;
    let (i, cipher_name) = array::<32>(i)?;
    let (i, cipher_mode) = array::<32>(i)?;
    let (i, hash_spec) = array::<32>(i)?;
    let (i, payload_offset) = be_u32(i)?;
    let (i, key_bytes) = be_u32(i)?;
    let (i, _mk_digest) = take(20usize)(i)?;
    let (i, _mk_salt) = take(32usize)(i)?;
    let (i, mk_iterations) = be_u32(i)?;
    let (mut i, uuid) = array::<40>(i)?;
    let mut slots = [KeySlot {
        active: 0,
        iterations: 0,
        key_offset: 0,
        stripes: 0,
    }; SLOTS];
    for slot in &mut slots {
        let (rest, s) = key_slot(i)?;
        *slot = s;
        i = rest;
    }
    Ok((
        i,
        Luks1 {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_iterations,
            uuid,
            slots,
        },
    ))
}

/// The C string in a fixed-size field: the bytes before the first NUL, or `None` when the
/// field has no NUL (qemu refuses such a field rather than read past it).
fn c_str(field: &[u8]) -> Option<&[u8]> {
    let end = field.iter().position(|&c| c == 0)?;
    field.get(..end)
}

/// A byte string for an error message.
fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).escape_debug().to_string()
}

fn slot_at(k: usize, field: u64) -> u64 {
    let k = u64::try_from(k).unwrap_or(u64::MAX);
    SLOTS_AT
        .saturating_add(k.saturating_mul(SLOT_LEN))
        .saturating_add(field)
}

/// Sectors of one slot's key material as qemu lays it out and checks it
/// (`qcrypto_block_luks_splitkeylen_sectors`): key bytes × stripes, rounded up to sectors,
/// then up to a multiple of the 4 KiB header. qemu multiplies in 32 bits; the product only
/// wraps for a key size its cipher lookup refuses anyway, so 64 bits give the same verdicts.
fn key_material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    u64::from(key_bytes)
        .saturating_mul(u64::from(stripes))
        .div_ceil(SECTOR)
        .next_multiple_of(HEADER_SECTORS)
}

/// qemu's layout check (crypto/block-luks.c `qcrypto_block_luks_check_header`, not detached),
/// in its order.
///
/// # Errors
/// `Invalid` (`luks.header`) at the offending field.
pub(super) fn check_layout(h: &Luks1) -> Result<()> {
    for (field, at, what) in [
        (&h.cipher_name[..], CIPHER_NAME_AT, "cipher name"),
        (&h.cipher_mode[..], CIPHER_MODE_AT, "cipher mode"),
        (&h.hash_spec[..], HASH_SPEC_AT, "hash spec"),
    ] {
        if c_str(field).is_none() {
            return Err(header_error(
                format!("the {what} is not NUL-terminated within its 32 bytes"),
                at,
            ));
        }
    }
    let payload = u64::from(h.payload_offset);
    if payload < HEADER_SECTORS {
        return Err(header_error(
            format!(
                "payload offset {} (sector {payload}) overlaps the 4 KiB header",
                payload.saturating_mul(SECTOR)
            ),
            PAYLOAD_OFFSET_AT,
        ));
    }
    if h.mk_iterations == 0 {
        return Err(header_error(
            "the master key iteration count is zero",
            MK_ITERATIONS_AT,
        ));
    }
    for (k, s) in h.slots.iter().enumerate() {
        if s.stripes != STRIPES {
            return Err(header_error(
                format!("key slot {k} has {} stripes, not {STRIPES}", s.stripes),
                slot_at(k, SLOT_STRIPES_AT),
            ));
        }
        if s.active != SLOT_ENABLED && s.active != SLOT_DISABLED {
            return Err(header_error(
                format!(
                    "key slot {k} state {:#010x} is neither enabled nor disabled",
                    s.active
                ),
                slot_at(k, 0),
            ));
        }
        if s.active == SLOT_ENABLED && s.iterations == 0 {
            return Err(header_error(
                format!("key slot {k} is enabled with an iteration count of zero"),
                slot_at(k, SLOT_ITERATIONS_AT),
            ));
        }
        let start = u64::from(s.key_offset);
        let len = key_material_sectors(h.key_bytes, s.stripes);
        if start < HEADER_SECTORS {
            return Err(header_error(
                format!("key slot {k}'s key material (sector {start}) overlaps the 4 KiB header"),
                slot_at(k, SLOT_KEY_OFFSET_AT),
            ));
        }
        // qemu adds in 32 bits, so key material ending past 2^32 sectors wraps and slips past
        // this check there; it lies past any payload it could precede, so refuse it.
        if start.saturating_add(len) > payload {
            return Err(header_error(
                format!(
                    "key slot {k}'s key material (sectors {start}+{len}) overlaps the payload \
                     at sector {payload}"
                ),
                slot_at(k, SLOT_KEY_OFFSET_AT),
            ));
        }
        for (j, t) in h.slots.iter().enumerate().skip(k.saturating_add(1)) {
            let start2 = u64::from(t.key_offset);
            let len2 = key_material_sectors(h.key_bytes, t.stripes);
            if start < start2.saturating_add(len2) && start2 < start.saturating_add(len) {
                return Err(header_error(
                    format!("the key material of key slots {k} and {j} overlaps"),
                    slot_at(j, SLOT_KEY_OFFSET_AT),
                ));
            }
        }
    }
    Ok(())
}

/// The cipher names qemu's LUKS driver knows and their key sizes in bytes
/// (crypto/block-luks.c `qcrypto_block_luks_cipher_name_map`). "sm4" is there only in builds
/// with `CONFIG_CRYPTO_SM4`; Debian's qemu 10.0 refuses it ("Algorithm 'sm4' not supported"),
/// so it is not accepted here.
const CIPHERS: [(&[u8], &[u32]); 4] = [
    (b"aes", &[16, 24, 32]),
    (b"cast5", &[16]),
    (b"serpent", &[16, 24, 32]),
    (b"twofish", &[16, 24, 32]),
];

/// Cipher modes: the `QCryptoCipherMode` enum (qapi/crypto.json), matched exactly.
const MODES: [&[u8]; 4] = [b"ecb", b"cbc", b"xts", b"ctr"];

/// IV generators: the `QCryptoIVGenAlgo` enum (qapi/crypto.json), matched exactly.
const IVGENS: [&[u8]; 3] = [b"plain", b"plain64", b"essiv"];

/// Hashes: the `QCryptoHashAlgo` enum (qapi/crypto.json; sm3 since qemu 9.2) with their digest
/// sizes in bytes (crypto/hash.c `qcrypto_hash_alg_size`), matched exactly.
const HASHES: [(&[u8], u32); 8] = [
    (b"md5", 16),
    (b"sha1", 20),
    (b"sha224", 28),
    (b"sha256", 32),
    (b"sha384", 48),
    (b"sha512", 64),
    (b"ripemd160", 20),
    (b"sm3", 32),
];

fn hash_digest(name: &[u8]) -> Option<u32> {
    HASHES.iter().find(|(n, _)| *n == name).map(|&(_, d)| d)
}

/// qemu's algorithm lookup (crypto/block-luks.c `qcrypto_block_luks_parse_header`), in its
/// order, then the key-size checks that decide whether the volume can be opened with its key.
/// Names are C strings compared byte for byte, case-sensitively (`g_str_equal`,
/// `qapi_enum_parse`). Call after `check_layout`, which guarantees the NULs.
///
/// # Errors
/// `Invalid` (`luks.header`) at the offending field.
pub(super) fn check_algorithms(h: &Luks1) -> Result<()> {
    let name = c_str(&h.cipher_name).unwrap_or_default();
    let spec = c_str(&h.cipher_mode).unwrap_or_default();
    let hash = c_str(&h.hash_spec).unwrap_or_default();
    let bad_mode = |why: String| header_error(why, CIPHER_MODE_AT);
    // "<mode>-<ivgen>[:<ivhash>]", split at the first '-' and then the first ':'.
    let Some(dash) = spec.iter().position(|&c| c == b'-') else {
        return Err(bad_mode(format!(
            "cipher mode \"{}\" is not <mode>-<iv generator>",
            show(spec)
        )));
    };
    let mode = spec.get(..dash).unwrap_or_default();
    let rest = spec.get(dash.saturating_add(1)..).unwrap_or_default();
    let (ivgen, ivhash) = match rest.iter().position(|&c| c == b':') {
        Some(colon) => (
            rest.get(..colon).unwrap_or_default(),
            Some(rest.get(colon.saturating_add(1)..).unwrap_or_default()),
        ),
        None => (rest, None),
    };
    // qemu looks the IV hash up whenever it is named, even for generators that ignore it.
    let ivhash_digest = match ivhash {
        Some(n) => Some(hash_digest(n).ok_or_else(|| {
            bad_mode(format!(
                "IV generator hash \"{}\" is not one qemu knows",
                show(n)
            ))
        })?),
        None => None,
    };
    if !MODES.contains(&mode) {
        return Err(bad_mode(format!(
            "cipher mode \"{}\" is not one qemu knows",
            show(mode)
        )));
    }
    let xts = mode == b"xts";
    // For XTS the master key holds two keys of the cipher's size (qemu halves it to look up).
    let cipher_key = if xts { h.key_bytes / 2 } else { h.key_bytes };
    let Some(&(_, sizes)) = CIPHERS.iter().find(|(n, _)| *n == name) else {
        return Err(header_error(
            format!(
                "cipher \"{}\" is not one qemu's LUKS driver knows",
                show(name)
            ),
            CIPHER_NAME_AT,
        ));
    };
    if !sizes.contains(&cipher_key) {
        return Err(header_error(
            format!(
                "cipher \"{}\"-{mode_s} has no {} byte key",
                show(name),
                h.key_bytes,
                mode_s = show(mode)
            ),
            KEY_BYTES_AT,
        ));
    }
    if hash_digest(hash).is_none() {
        return Err(header_error(
            format!("hash \"{}\" is not one qemu knows", show(hash)),
            HASH_SPEC_AT,
        ));
    }
    if !IVGENS.contains(&ivgen) {
        return Err(bad_mode(format!(
            "IV generator \"{}\" is not one qemu knows",
            show(ivgen)
        )));
    }
    if ivgen == b"essiv" {
        let Some(digest) = ivhash_digest else {
            return Err(bad_mode("the essiv IV generator names no hash".into()));
        };
        // ESSIV keys a second instance of the cipher with the hash's digest
        // (`qcrypto_block_luks_essiv_cipher`): the digest must be a key size of the cipher.
        if !sizes.contains(&digest) {
            return Err(bad_mode(format!(
                "essiv with a {digest}-byte digest has no \"{}\" key of that size",
                show(name)
            )));
        }
    }
    check_keyed_open(h, name, xts)
}

/// Headers that `qemu-img info` opens but that qemu cannot open with their key, found by
/// creating and opening volumes with qemu-img 10.0 and confirmed in crypto/cipher.c and
/// crypto/block.c. A volume nothing can open is as unusable as one qemu refuses at once.
fn check_keyed_open(h: &Luks1, name: &[u8], xts: bool) -> Result<()> {
    // qcrypto_cipher_validate_key_length: "XTS cipher key length should be a multiple of 2";
    // the halved lookup above rounds an odd length down and lets it through.
    if xts && h.key_bytes % 2 != 0 {
        return Err(header_error(
            format!("an XTS key of {} bytes is not two equal keys", h.key_bytes),
            KEY_BYTES_AT,
        ));
    }
    // XTS needs a 16-byte block; cast5's is 8 ("Unsupported cipher mode xts").
    if xts && name == b"cast5" {
        return Err(header_error(
            "cast5 has 8-byte blocks and cannot run in XTS mode",
            CIPHER_MODE_AT,
        ));
    }
    // qemu decrypts a slot's key material (key bytes × stripes) in 512-byte sectors and
    // asserts that it is whole sectors (crypto/block.c `do_qcrypto_block_cipher_encdec`,
    // "QEMU_IS_ALIGNED(len, sectorsize)"): a 24-byte key outside XTS aborts qemu.
    let material = u64::from(h.key_bytes).saturating_mul(u64::from(STRIPES));
    if material % SECTOR != 0 {
        return Err(header_error(
            format!(
                "{} key bytes × {STRIPES} stripes is not whole 512-byte sectors, which qemu \
                 cannot decrypt",
                h.key_bytes
            ),
            KEY_BYTES_AT,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header laid out as qemu writes one: `key_bytes`, eight disabled slots of 4000 stripes
    /// whose key material follows each other from sector 8, the payload right after.
    fn header(cipher: &[u8], mode: &[u8], key_bytes: u32) -> Vec<u8> {
        let mut b = vec![0u8; 592];
        b[..6].copy_from_slice(crate::luks::MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        b[8..8 + cipher.len()].copy_from_slice(cipher);
        b[40..40 + mode.len()].copy_from_slice(mode);
        b[72..78].copy_from_slice(b"sha256");
        let len = key_material_sectors(key_bytes, STRIPES) as u32;
        b[104..108].copy_from_slice(&(8 + 8 * len).to_be_bytes());
        b[108..112].copy_from_slice(&key_bytes.to_be_bytes());
        b[164..168].copy_from_slice(&1000u32.to_be_bytes());
        for k in 0..8 {
            let s = 208 + 48 * k;
            b[s..s + 4].copy_from_slice(&SLOT_DISABLED.to_be_bytes());
            b[s + 40..s + 44].copy_from_slice(&(8 + k as u32 * len).to_be_bytes());
            b[s + 44..s + 48].copy_from_slice(&STRIPES.to_be_bytes());
        }
        b
    }

    fn verdict(b: &[u8]) -> std::result::Result<(), u64> {
        let (_, h) = parse(b).unwrap();
        check_layout(&h)
            .and_then(|()| check_algorithms(&h))
            .map_err(|e| e.offset().unwrap())
    }

    #[test]
    fn qemu_layouts_pass_and_key_material_is_sized_like_qemu() {
        // qemu-img's payload offsets: 4040 sectors for 64 key bytes, 2056 for 32.
        assert_eq!(8 + 8 * key_material_sectors(64, STRIPES), 4040);
        assert_eq!(8 + 8 * key_material_sectors(32, STRIPES), 2056);
        for (c, m, k) in [
            (&b"aes"[..], &b"xts-plain64"[..], 64),
            (b"aes", b"xts-plain64", 48),
            (b"serpent", b"cbc-essiv:sha256", 16),
            (b"twofish", b"ctr-plain:md5", 32),
            (b"cast5", b"cbc-essiv:md5", 16),
            (b"cast5", b"ecb-plain", 16),
            (b"aes", b"xts-essiv:sm3", 32),
        ] {
            assert_eq!(verdict(&header(c, m, k)), Ok(()), "{c:?} {m:?} {k}");
        }
    }

    #[test]
    fn each_refusal_names_its_field() {
        // ESSIV keys the cipher with the hash's digest: sha1's 20 bytes fit no AES key, and
        // cast5 takes only md5's 16.
        assert_eq!(verdict(&header(b"aes", b"cbc-essiv:sha1", 32)), Err(40));
        assert_eq!(verdict(&header(b"cast5", b"cbc-essiv:sha256", 16)), Err(40));
        // The part after the NUL is not read.
        assert_eq!(verdict(&header(b"aes\0zz", b"xts-plain64\0q", 64)), Ok(()));
        // Key material that ends past 2^32 sectors, which qemu's 32-bit sum wraps.
        let mut b = header(b"aes", b"xts-plain64", 64);
        b[208 + 40..208 + 44].copy_from_slice(&0xFFFF_FF00u32.to_be_bytes());
        assert_eq!(verdict(&b), Err(248));
        // Slots are checked in order; an enabled slot needs iterations, a disabled one not.
        let mut b = header(b"aes", b"xts-plain64", 64);
        b[208 + 48..208 + 52].copy_from_slice(&SLOT_ENABLED.to_be_bytes());
        assert_eq!(verdict(&b), Err(256 + 4));
        b[256 + 4..256 + 8].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(verdict(&b), Ok(()));
    }
}
