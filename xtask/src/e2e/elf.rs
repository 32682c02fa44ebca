//! Just enough of ELF64 (little-endian) to read a kernel module's `.modinfo` section and to
//! tell a static executable from a dynamic one.

/// `e_ident`: magic, ELFCLASS64, ELFDATA2LSB.
const IDENT: &[u8] = b"\x7fELF\x02\x01";
/// Program header type of the interpreter request a dynamic executable carries.
const PT_INTERP: u32 = 3;

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let raw = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([raw[0], raw[1]]))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(raw.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<usize> {
    let raw = bytes.get(at..at.checked_add(8)?)?;
    usize::try_from(u64::from_le_bytes(raw.try_into().ok()?)).ok()
}

fn check_ident(elf: &[u8]) -> Result<(), String> {
    if elf.starts_with(IDENT) {
        Ok(())
    } else {
        Err("not a little-endian ELF64 file".to_owned())
    }
}

/// The contents of the section called `name`, or `None` if there is none.
pub(crate) fn section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, String> {
    check_ident(elf)?;
    let bad = || "truncated or inconsistent section headers".to_owned();
    // e_shoff, e_shentsize, e_shnum, e_shstrndx.
    let shoff = read_u64(elf, 0x28).ok_or_else(bad)?;
    let shentsize = usize::from(read_u16(elf, 0x3a).ok_or_else(bad)?);
    let shnum = usize::from(read_u16(elf, 0x3c).ok_or_else(bad)?);
    let shstrndx = usize::from(read_u16(elf, 0x3e).ok_or_else(bad)?);
    // In a section header: sh_name at 0, sh_offset at 24, sh_size at 32.
    let header = |index: usize| -> Option<(usize, &'a [u8])> {
        let base = shoff.checked_add(index.checked_mul(shentsize)?)?;
        let name = usize::try_from(read_u32(elf, base)?).ok()?;
        let offset = read_u64(elf, base + 24)?;
        let size = read_u64(elf, base + 32)?;
        Some((name, elf.get(offset..offset.checked_add(size)?)?))
    };
    let (_, names) = header(shstrndx).ok_or_else(bad)?;
    for index in 0..shnum {
        let (name_at, contents) = header(index).ok_or_else(bad)?;
        let section_name = names
            .get(name_at..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .ok_or_else(bad)?;
        if section_name == name.as_bytes() {
            return Ok(Some(contents));
        }
    }
    Ok(None)
}

/// Does this executable ask for a program interpreter (a dynamic loader)? A static busybox
/// does not, and only a static one can run alone in the initramfs.
pub(crate) fn has_interpreter(elf: &[u8]) -> Result<bool, String> {
    check_ident(elf)?;
    let bad = || "truncated or inconsistent program headers".to_owned();
    // e_phoff, e_phentsize, e_phnum; p_type is the first field of a program header.
    let phoff = read_u64(elf, 0x20).ok_or_else(bad)?;
    let phentsize = usize::from(read_u16(elf, 0x36).ok_or_else(bad)?);
    let phnum = usize::from(read_u16(elf, 0x38).ok_or_else(bad)?);
    for index in 0..phnum {
        let at = index
            .checked_mul(phentsize)
            .and_then(|off| off.checked_add(phoff))
            .ok_or_else(bad)?;
        if read_u32(elf, at).ok_or_else(bad)? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 file: header, one program header of type `ph_type`, and sections
    /// "" (null), ".shstrtab" and ".modinfo" holding `modinfo`.
    fn tiny_elf(ph_type: u32, modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(IDENT);
        // Program header right after the ELF header.
        let phoff = elf.len();
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&ph_type.to_le_bytes());
        elf.extend_from_slice(&ph);
        let strtab_at = elf.len();
        elf.extend_from_slice(shstrtab);
        let modinfo_at = elf.len();
        elf.extend_from_slice(modinfo);
        let shoff = elf.len();
        let mut section = |name: u32, offset: usize, size: usize| {
            let mut sh = vec![0u8; 64];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[24..32].copy_from_slice(&(offset as u64).to_le_bytes());
            sh[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&sh);
        };
        section(0, 0, 0);
        section(1, strtab_at, shstrtab.len());
        section(11, modinfo_at, modinfo.len());
        elf[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn section_is_found_by_name() {
        let elf = tiny_elf(1, b"depends=a,b\0");
        assert_eq!(
            section(&elf, ".modinfo").unwrap(),
            Some(&b"depends=a,b\0"[..])
        );
    }

    #[test]
    fn missing_section_is_none() {
        let elf = tiny_elf(1, b"");
        assert_eq!(section(&elf, ".text").unwrap(), None);
    }

    #[test]
    fn truncated_file_is_an_error_not_a_panic() {
        let elf = tiny_elf(1, b"depends=\0");
        for len in 0..elf.len() {
            let _ = section(&elf[..len], ".modinfo");
            let _ = has_interpreter(&elf[..len]);
        }
        assert!(section(&elf[..70], ".modinfo").is_err());
    }

    #[test]
    fn interp_program_header_means_dynamic() {
        assert!(has_interpreter(&tiny_elf(PT_INTERP, b"")).unwrap());
        assert!(!has_interpreter(&tiny_elf(1, b"")).unwrap());
    }

    #[test]
    fn non_elf_is_refused() {
        assert!(section(b"#!/bin/sh\n", ".modinfo").is_err());
    }
}
