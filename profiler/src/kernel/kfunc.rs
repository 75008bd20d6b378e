//! Where the deep hooks are on the running kernel: kallsyms says whether a function exists out
//! of line and in which module (a module that is not loaded, or a function the compiler inlined,
//! is absent), BTF says where its packet is among the arguments.

use std::{cell::OnceCell, collections::HashMap};

use anyhow::{anyhow, bail, Result};
use btf_rs::Btf;
use profiler_common::FuncHook;

use super::btf::{function_args, tracepoint_args, KernelBtf};
use crate::datapath::{HookDef, Via};

const KALLSYMS: &str = "/proc/kallsyms";

/// What a deep hook attaches to and what its program is told about it.
#[derive(Debug)]
pub struct ResolvedHook {
    /// The kprobe symbol ("module:function" where the name alone is ambiguous) or tracepoint.
    pub attach_to: String,
    /// The `FUNCS` key: the function's address (what bpf_get_func_ip returns), or the hook id
    /// for a module tracepoint.
    pub key: u64,
    pub args: FuncHook,
}

/// Text symbols by name: address and module (None: built in).
type Symbols = HashMap<String, Vec<(u64, Option<String>)>>;

pub struct Resolver<'a> {
    kernel: &'a KernelBtf,
    /// Read at the first function looked up: module tracepoints, and kernels without kprobes,
    /// need none.
    symbols: OnceCell<Result<Symbols, String>>,
    /// Module BTF, loaded once per module.
    modules: HashMap<String, Result<Btf, String>>,
}

impl<'a> Resolver<'a> {
    pub fn new(kernel: &'a KernelBtf) -> Self {
        Resolver {
            kernel,
            symbols: OnceCell::new(),
            modules: HashMap::new(),
        }
    }

    fn symbols(&self) -> Result<&Symbols> {
        self.symbols
            .get_or_init(|| {
                let text = std::fs::read_to_string(KALLSYMS)
                    .map_err(|e| format!("reading {KALLSYMS}: {e}"))?;
                let symbols = parse_kallsyms(&text);
                if symbols.values().flatten().all(|(addr, _)| *addr == 0) {
                    return Err(format!(
                        "{KALLSYMS} hides addresses (kernel.kptr_restrict): run as root"
                    ));
                }
                Ok(symbols)
            })
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    /// The target of a deep hook, or why this kernel has none.
    pub fn resolve(&mut self, spec: &HookDef) -> Result<ResolvedHook> {
        match spec.via {
            Via::Function { func, module } => {
                let (addr, in_module, ambiguous) = self.symbol(func, module)?;
                let args = function_args(self.btf(in_module.as_deref())?, spec.id, func)?;
                let attach_to = match (ambiguous, in_module) {
                    (true, Some(m)) => format!("{m}:{func}"),
                    _ => func.to_string(),
                };
                Ok(ResolvedHook {
                    attach_to,
                    key: addr,
                    args,
                })
            }
            Via::ModuleTracepoint { tp, module } => {
                if !std::path::Path::new("/sys/module").join(module).exists() {
                    bail!("module {module} is not loaded");
                }
                let args = tracepoint_args(self.btf(Some(module))?, spec.id, tp)?;
                Ok(ResolvedHook {
                    attach_to: tp.to_string(),
                    key: spec.id as u64,
                    args,
                })
            }
            Via::DriverXmit => bail!("{} is resolved per NIC", spec.label),
            Via::Tracepoint { .. } | Via::Tc { .. } | Via::Netfilter { .. } => {
                bail!("{} is a stable hook, not a kernel function", spec.label)
            }
        }
    }

    /// The function at `addr` (a NIC's `ndo_start_xmit`) as a target of `spec`'s hook, with
    /// its name and module.
    pub fn resolve_at(
        &mut self,
        spec: &HookDef,
        addr: u64,
    ) -> Result<(String, Option<String>, ResolvedHook)> {
        let symbols = self.symbols()?;
        let (func, module) = symbols
            .iter()
            .find_map(|(name, at)| {
                let (_, m) = at.iter().find(|(a, _)| *a == addr)?;
                Some((name.clone(), m.clone()))
            })
            .ok_or_else(|| anyhow!("no function symbol at {addr:#x}"))?;
        let ambiguous = symbols.get(&func).is_some_and(|at| at.len() > 1);
        let args = function_args(self.btf(module.as_deref())?, spec.id, &func)?;
        let attach_to = match (&module, ambiguous) {
            (Some(m), true) => format!("{m}:{func}"),
            _ => func.clone(),
        };
        let hook = ResolvedHook {
            attach_to,
            key: addr,
            args,
        };
        Ok((func, module, hook))
    }

    /// The function's address and module, and whether its name alone is ambiguous. Built-in
    /// code is preferred to a module of another name; the hook's own module to both.
    fn symbol(&self, func: &str, module: &str) -> Result<(u64, Option<String>, bool)> {
        let found = self
            .symbols()?
            .get(func)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let pick = found
            .iter()
            .find(|(_, m)| m.as_deref() == Some(module))
            .or_else(|| found.iter().find(|(_, m)| m.is_none()));
        match pick {
            Some((addr, m)) => Ok((*addr, m.clone(), found.len() > 1)),
            None if found.is_empty() => bail!(
                "{func} is not in this kernel's symbols (module {module} not loaded, or the function is inlined)"
            ),
            None => bail!("{func} is only in modules other than {module}"),
        }
    }

    fn btf(&mut self, module: Option<&str>) -> Result<&Btf> {
        let Some(m) = module else {
            return Ok(self.kernel.vmlinux());
        };
        let kernel = self.kernel;
        self.modules
            .entry(m.to_string())
            .or_insert_with(|| kernel.module(m).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }
}

/// Text symbols of `/proc/kallsyms` ("ADDR TYPE NAME [MODULE]") by name.
fn parse_kallsyms(text: &str) -> HashMap<String, Vec<(u64, Option<String>)>> {
    let mut symbols: HashMap<String, Vec<_>> = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !kind.eq_ignore_ascii_case("t") {
            continue;
        }
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        let module = fields
            .next()
            .map(|m| m.trim_start_matches('[').trim_end_matches(']').to_string());
        symbols
            .entry(name.to_string())
            .or_default()
            .push((addr, module));
    }
    symbols
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_text_symbols_and_their_modules() {
        let text = "ffffffff81000000 T _stext\n\
                    ffffffff81234560 t start_xmit\t[virtio_net]\n\
                    ffffffffc0001000 t start_xmit\t[other_nic]\n\
                    ffffffff82000000 D some_data\n\
                    ffffffffc0002000 t veth_xmit\t[veth]\n";
        let s = parse_kallsyms(text);
        assert_eq!(s["_stext"], [(0xffffffff81000000, None)]);
        assert_eq!(s["start_xmit"].len(), 2);
        assert_eq!(s["veth_xmit"], [(0xffffffffc0002000, Some("veth".into()))]);
        assert!(!s.contains_key("some_data"));
    }

    #[test]
    fn picks_the_hooks_own_module_and_says_when_the_name_is_shared() {
        let kernel = match KernelBtf::load() {
            Ok(kernel) => kernel,
            Err(e) => {
                eprintln!("skipped: cannot read this kernel's BTF: {e:#}");
                return;
            }
        };
        let mut r = Resolver {
            kernel: &kernel,
            symbols: OnceCell::from(Ok(parse_kallsyms(
                "ffffffff81234560 t start_xmit\t[other_nic]\n\
                 ffffffffc0001000 t start_xmit\t[virtio_net]\n\
                 ffffffffc0002000 t veth_xmit\n",
            ))),
            modules: HashMap::new(),
        };
        assert_eq!(
            r.symbol("start_xmit", "virtio_net")
                .unwrap_or_else(|e| panic!("start_xmit in virtio_net: {e:#}")),
            (0xffffffffc0001000, Some("virtio_net".into()), true)
        );
        assert_eq!(
            r.symbol("veth_xmit", "veth")
                .unwrap_or_else(|e| panic!("veth_xmit in veth: {e:#}")),
            (0xffffffffc0002000, None, false)
        );
        let e = r.symbol("ipvlan_queue_xmit", "ipvlan").unwrap_err();
        assert!(e.to_string().contains("not loaded"), "{e}");
        assert!(r.symbol("start_xmit", "e1000").is_err());
        // A module that is not there has no BTF: a reason, not a panic.
        assert!(r.btf(Some("no_such_module")).is_err());
    }
}
