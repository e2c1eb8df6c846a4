//! Glance's `disk_format`/`container_format` values and what glimpse inspects for each pair.

use glimpse_formats::Format;

/// Glance's `disk_format` values (Images API v2, stock `disk_formats` option).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskFormat {
    /// Amazon machine image (raw content).
    Ami,
    /// Amazon ramdisk image (raw content).
    Ari,
    /// Amazon kernel image (raw content).
    Aki,
    /// Microsoft VHD (qemu's `vpc`).
    #[value(alias = "vpc")]
    Vhd,
    /// Microsoft VHDX.
    Vhdx,
    /// VMware VMDK.
    Vmdk,
    /// Raw disk.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VirtualBox VDI.
    Vdi,
    /// ISO 9660.
    Iso,
    /// Virtuozzo ploop (qemu's `parallels`).
    Ploop,
}

impl DiskFormat {
    /// The value Glance stores.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Ami => "ami",
            DiskFormat::Ari => "ari",
            DiskFormat::Aki => "aki",
            DiskFormat::Vhd => "vhd",
            DiskFormat::Vhdx => "vhdx",
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vdi => "vdi",
            DiskFormat::Iso => "iso",
            DiskFormat::Ploop => "ploop",
        }
    }

    /// The disk format Glance should be told for a detected format, when there is one.
    pub fn from_detected(f: Format) -> Option<DiskFormat> {
        Some(match f {
            Format::Raw => DiskFormat::Raw,
            Format::Qcow2 => DiskFormat::Qcow2,
            Format::Vmdk => DiskFormat::Vmdk,
            Format::Vhd => DiskFormat::Vhd,
            Format::Vhdx => DiskFormat::Vhdx,
            Format::Vdi => DiskFormat::Vdi,
            Format::Iso => DiskFormat::Iso,
            // an OVA's disks are VMDKs (OVF 2.0 names streamOptimized VMDK as the disk format)
            Format::Ova => DiskFormat::Vmdk,
            Format::Parallels => DiskFormat::Ploop,
            Format::Qed
            | Format::Luks
            | Format::Qcow1
            | Format::Bochs
            | Format::Cloop
            | Format::Dmg => return None,
        })
    }
}

/// Glance's `container_format` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ContainerFormat {
    /// Amazon machine image.
    Ami,
    /// Amazon ramdisk.
    Ari,
    /// Amazon kernel.
    Aki,
    /// No container: the data is the disk.
    Bare,
    /// OVF: the data is the disk (the descriptor is not uploaded).
    Ovf,
    /// An OVA tar (descriptor, manifest, disks).
    Ova,
    /// A docker tar archive (not inspected).
    Docker,
    /// A compressed archive (not inspected).
    Compressed,
}

impl ContainerFormat {
    /// The value Glance stores.
    pub fn name(self) -> &'static str {
        match self {
            ContainerFormat::Ami => "ami",
            ContainerFormat::Ari => "ari",
            ContainerFormat::Aki => "aki",
            ContainerFormat::Bare => "bare",
            ContainerFormat::Ovf => "ovf",
            ContainerFormat::Ova => "ova",
            ContainerFormat::Docker => "docker",
            ContainerFormat::Compressed => "compressed",
        }
    }
}

/// What to inspect before uploading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Run the full policy with this expected format.
    Expect(Format),
    /// glimpse cannot read this pair: upload with a warning saying why.
    Uninspectable(String),
}

/// Decides the inspection for a pair, or says why Glance would refuse the pair anyway.
///
/// # Errors
/// The pair mixes an Amazon format with another one (Glance refuses it with 400).
pub fn plan(disk: DiskFormat, container: ContainerFormat) -> Result<Plan, String> {
    let amazon_disk = matches!(disk, DiskFormat::Ami | DiskFormat::Ari | DiskFormat::Aki);
    let amazon_container = matches!(
        container,
        ContainerFormat::Ami | ContainerFormat::Ari | ContainerFormat::Aki
    );
    if (amazon_disk || amazon_container) && disk.name() != container.name() {
        return Err(format!(
            "disk_format {} with container_format {}: Glance requires the two to match when either is ami, ari or aki",
            disk.name(),
            container.name()
        ));
    }
    Ok(match (disk, container) {
        (_, ContainerFormat::Docker | ContainerFormat::Compressed) => Plan::Uninspectable(format!(
            "container_format {} is an archive glimpse does not open: its content is uploaded unchecked",
            container.name()
        )),
        (_, ContainerFormat::Ova) => Plan::Expect(Format::Ova),
        // ploop is qemu's parallels: inspected like every format; anything else declared
        // ploop is a format.mismatch.
        (DiskFormat::Ploop, _) => Plan::Expect(Format::Parallels),
        // Nova boots ami/ari/aki as plain bytes: any image-format header in them is refused.
        (DiskFormat::Ami | DiskFormat::Ari | DiskFormat::Aki, _) => Plan::Expect(Format::Raw),
        (DiskFormat::Raw, _) => Plan::Expect(Format::Raw),
        (DiskFormat::Qcow2, _) => Plan::Expect(Format::Qcow2),
        (DiskFormat::Vmdk, _) => Plan::Expect(Format::Vmdk),
        (DiskFormat::Vhd, _) => Plan::Expect(Format::Vhd),
        (DiskFormat::Vhdx, _) => Plan::Expect(Format::Vhdx),
        (DiskFormat::Vdi, _) => Plan::Expect(Format::Vdi),
        (DiskFormat::Iso, _) => Plan::Expect(Format::Iso),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn every_glance_pair_has_a_plan_or_a_reason() {
        for d in DiskFormat::value_variants() {
            for c in ContainerFormat::value_variants() {
                let p = plan(*d, *c);
                let amazon = ["ami", "ari", "aki"];
                let mixed = (amazon.contains(&d.name()) || amazon.contains(&c.name()))
                    && d.name() != c.name();
                assert_eq!(p.is_err(), mixed, "{} {}", d.name(), c.name());
            }
        }
        assert_eq!(
            plan(DiskFormat::Ami, ContainerFormat::Ami),
            Ok(Plan::Expect(Format::Raw))
        );
        assert_eq!(
            plan(DiskFormat::Vmdk, ContainerFormat::Ova),
            Ok(Plan::Expect(Format::Ova))
        );
        assert!(matches!(
            plan(DiskFormat::Ploop, ContainerFormat::Bare),
            Ok(Plan::Expect(Format::Parallels))
        ));
        assert!(matches!(
            plan(DiskFormat::Raw, ContainerFormat::Docker),
            Ok(Plan::Uninspectable(_))
        ));
        assert_eq!(
            plan(DiskFormat::Qcow2, ContainerFormat::Ovf),
            Ok(Plan::Expect(Format::Qcow2))
        );
    }

    #[test]
    fn names_are_the_clap_names() {
        for d in DiskFormat::value_variants() {
            assert_eq!(d.to_possible_value().unwrap().get_name(), d.name());
        }
        for c in ContainerFormat::value_variants() {
            assert_eq!(c.to_possible_value().unwrap().get_name(), c.name());
        }
    }
}
