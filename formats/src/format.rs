//! Format names.

use std::fmt;
use std::str::FromStr;

/// An image format, named as Glance names its `disk_format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// No container: the guest disk byte for byte.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware virtual disk (sparse, streamOptimized, descriptor).
    Vmdk,
    /// Microsoft Virtual Hard Disk (qemu's `vpc`).
    Vhd,
    /// Microsoft VHDX.
    Vhdx,
    /// VirtualBox disk image.
    Vdi,
    /// ISO 9660 optical image.
    Iso,
    /// Open Virtual Appliance: a tar with an OVF descriptor and disks.
    Ova,
    /// QEMU enhanced disk: detected so that it can be refused.
    Qed,
    /// LUKS encrypted volume: detected and described only.
    Luks,
    /// QEMU copy-on-write version 1 (qemu's `qcow`): detected so that it can be refused.
    Qcow1,
    /// Parallels / Virtuozzo ploop (qemu's `parallels`; Glance's `ploop`).
    Parallels,
    /// Bochs growing redolog: detected so that it can be refused.
    Bochs,
    /// cloop compressed loopback image: detected so that it can be refused.
    Cloop,
    /// Apple disk image (UDIF, `koly` trailer): detected so that it can be refused.
    Dmg,
}

impl Format {
    /// Every format, in detection order.
    pub const ALL: [Format; 15] = [
        Format::Qcow1,
        Format::Qcow2,
        Format::Qed,
        Format::Vmdk,
        Format::Vhd,
        Format::Vhdx,
        Format::Vdi,
        Format::Luks,
        Format::Iso,
        Format::Ova,
        Format::Parallels,
        Format::Bochs,
        Format::Cloop,
        Format::Dmg,
        Format::Raw,
    ];

    /// Glance's name for the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Iso => "iso",
            Format::Ova => "ova",
            Format::Qed => "qed",
            Format::Luks => "luks",
            Format::Qcow1 => "qcow1",
            Format::Parallels => "ploop",
            Format::Bochs => "bochs",
            Format::Cloop => "cloop",
            Format::Dmg => "dmg",
        }
    }

    /// qemu-img's name for the format (`vpc` for VHD, `qcow` for qcow1, `parallels` for ploop), for comparisons with
    /// qemu-img.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Format::Vhd => "vpc",
            Format::Qcow1 => "qcow",
            Format::Parallels => "parallels",
            other => other.name(),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of parsing an unknown format name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown format {0:?} (expected raw, qcow2, vmdk, vhd, vhdx, vdi, ploop, iso, ova; vpc is an alias of vhd, parallels of ploop)")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vhd" | "vpc" => Format::Vhd,
            "vhdx" => Format::Vhdx,
            "vdi" => Format::Vdi,
            "iso" => Format::Iso,
            "ova" => Format::Ova,
            "qed" => Format::Qed,
            "luks" => Format::Luks,
            "qcow1" | "qcow" => Format::Qcow1,
            "parallels" | "ploop" => Format::Parallels,
            "bochs" => Format::Bochs,
            "cloop" => Format::Cloop,
            "dmg" => Format::Dmg,
            _ => return Err(UnknownFormat(s.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_vpc_is_vhd() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        assert_eq!("vpc".parse::<Format>().unwrap(), Format::Vhd);
        assert_eq!("qcow".parse::<Format>().unwrap(), Format::Qcow1);
        assert_eq!(Format::Qcow1.qemu_name(), "qcow");
        assert!("qcow3".parse::<Format>().is_err());
    }
}
