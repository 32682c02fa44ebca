//! The kernel modules the guest needs, in the order `insmod` must load them.
//!
//! Debian's cloud kernel builds virtio_pci, virtio_blk, virtio_rng and virtio_net as modules. The package
//! ships no modules.dep (depmod writes it at install time, and we only unpack the package), so
//! each module's dependencies come from its own `.modinfo` section (`depends=a,b`), which is
//! what depmod reads too. Built-in drivers are listed in modules.builtin and need no file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::elf;

/// The drivers the guest uses: the PCI transport and the device drivers.
pub(crate) const WANTED: &[&str] = &["virtio_pci", "virtio_blk", "virtio_rng", "virtio_net"];

/// A module's name as the kernel spells it: the file name without `.ko[.xz|.zst|.gz]`, with
/// dashes as underscores (virtio-rng.ko is module virtio_rng).
pub(crate) fn module_name(file_name: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suffix| file_name.strip_suffix(suffix))?;
    Some(stem.replace('-', "_"))
}

/// The `depends=` list of a module's `.modinfo` (NUL-separated `key=value` strings).
pub(crate) fn depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|name| !name.is_empty())
                .map(|name| name.replace('-', "_"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Answers a module's dependencies: `Ok(None)` for a built-in module.
pub(crate) type DepsOf<'a> = dyn FnMut(&str) -> Result<Option<Vec<String>>, String> + 'a;

/// `wanted` and everything they depend on, dependencies first, each once. `deps_of` answers
/// `Ok(None)` for a built-in module (nothing to load) and `Ok(Some(deps))` for a module file.
pub(crate) fn load_order(wanted: &[&str], deps_of: &mut DepsOf<'_>) -> Result<Vec<String>, String> {
    fn visit(
        name: &str,
        deps_of: &mut DepsOf<'_>,
        path: &mut Vec<String>,
        done: &mut Vec<String>,
    ) -> Result<(), String> {
        if done.iter().any(|n| n == name) {
            return Ok(());
        }
        if path.iter().any(|n| n == name) {
            return Err(format!(
                "module dependency cycle: {} -> {name}",
                path.join(" -> ")
            ));
        }
        let Some(deps) = deps_of(name)? else {
            return Ok(());
        };
        path.push(name.to_owned());
        for dep in &deps {
            visit(dep, deps_of, path, done)?;
        }
        path.pop();
        done.push(name.to_owned());
        Ok(())
    }
    let mut done = Vec::new();
    for name in wanted {
        visit(name, deps_of, &mut Vec::new(), &mut done)?;
    }
    Ok(done)
}

/// A module tree unpacked from the kernel package: lib/modules/<version>.
#[derive(Debug)]
pub(crate) struct ModuleTree {
    files: HashMap<String, PathBuf>,
    builtin: Vec<String>,
}

impl ModuleTree {
    /// Indexes every module file under `dir` and reads `dir/modules.builtin`.
    pub(crate) fn open(dir: &Path) -> Result<Self, String> {
        let mut files = HashMap::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(current) = pending.pop() {
            let entries = std::fs::read_dir(&current)
                .map_err(|err| format!("cannot list {}: {err}", current.display()))?;
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                } else if let Some(name) = module_name(&entry.file_name().to_string_lossy()) {
                    files.insert(name, path);
                }
            }
        }
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.rsplit('/').next().and_then(module_name))
            .collect();
        Ok(Self { files, builtin })
    }

    /// The uncompressed bytes of module `name`; `.ko.xz` is decompressed with `xz`, because
    /// busybox insmod may not do it.
    pub(crate) fn load(&self, name: &str) -> Result<Vec<u8>, String> {
        let path = self
            .files
            .get(name)
            .ok_or_else(|| format!("no module file for {name}"))?;
        let display = path.display().to_string();
        if display.ends_with(".ko") {
            return std::fs::read(path).map_err(|err| format!("cannot read {display}: {err}"));
        }
        let tool = if display.ends_with(".xz") {
            "xz"
        } else if display.ends_with(".zst") {
            "zstd"
        } else {
            "gzip"
        };
        let out = std::process::Command::new(tool)
            .args(["-dc", &display])
            .output()
            .map_err(|err| format!("cannot run `{tool} -dc {display}`: {err} (install {tool})"))?;
        if !out.status.success() {
            return Err(format!("`{tool} -dc {display}` failed"));
        }
        Ok(out.stdout)
    }

    /// The modules to put in the initramfs, in load order, with their bytes.
    pub(crate) fn resolve(&self, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>, String> {
        let mut cache: HashMap<String, Vec<u8>> = HashMap::new();
        let order = load_order(wanted, &mut |name| {
            if !self.files.contains_key(name) {
                return if self.builtin.iter().any(|b| b == name) {
                    Ok(None)
                } else {
                    Err(format!("module {name} is neither a file nor built in"))
                };
            }
            let bytes = self.load(name)?;
            let modinfo = elf::section(&bytes, ".modinfo")
                .map_err(|err| format!("module {name}: {err}"))?
                .ok_or_else(|| format!("module {name} has no .modinfo"))?;
            let deps = depends(modinfo);
            cache.insert(name.to_owned(), bytes);
            Ok(Some(deps))
        })?;
        Ok(order
            .into_iter()
            .map(|name| {
                let bytes = cache.remove(&name).unwrap_or_default();
                (name, bytes)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> HashMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(name, deps)| {
                (
                    (*name).to_owned(),
                    deps.iter().map(|d| (*d).to_owned()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn dependencies_come_before_their_users_once_each() {
        let g = graph(&[
            (
                "virtio_pci",
                &["virtio_ring", "virtio_pci_modern_dev", "virtio"],
            ),
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("virtio", &["virtio_ring"]),
            ("virtio_ring", &[]),
            ("virtio_pci_modern_dev", &[]),
        ]);
        let order = load_order(&["virtio_pci", "virtio_blk"], &mut |n| {
            Ok(g.get(n).cloned())
        })
        .unwrap();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio",
                "virtio_pci",
                "virtio_blk"
            ]
        );
    }

    #[test]
    fn builtin_modules_are_left_out() {
        let g = graph(&[("virtio_blk", &["virtio"])]);
        let order = load_order(&["virtio_blk"], &mut |n| Ok(g.get(n).cloned())).unwrap();
        assert_eq!(order, ["virtio_blk"]);
    }

    #[test]
    fn cycle_is_an_error() {
        let g = graph(&[("a", &["b"]), ("b", &["a"])]);
        let err = load_order(&["a"], &mut |n| Ok(g.get(n).cloned())).unwrap_err();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn modinfo_depends_are_split_and_normalised() {
        let modinfo = b"license=GPL\0depends=virtio,virtio-ring\0name=virtio_blk\0";
        assert_eq!(depends(modinfo), ["virtio", "virtio_ring"]);
        assert!(depends(b"depends=\0").is_empty());
    }

    #[test]
    fn module_names_drop_suffix_and_dashes() {
        assert_eq!(module_name("virtio-rng.ko").as_deref(), Some("virtio_rng"));
        assert_eq!(
            module_name("virtio_blk.ko.xz").as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(module_name("modules.dep"), None);
    }
}
