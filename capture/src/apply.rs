//! The I/O: finds `nft` / `iptables`, reads what is installed, and feeds the
//! rendered rules to the tools. Everything it decides on is rendered by
//! [`crate::nft`] and [`crate::iptables`].

use crate::config::CaptureConfig;
use crate::error::CaptureError;
use crate::iptables::{self, Family, NatState};
use crate::nft;
use crate::report::{Action, Report, TableReport};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Which tool `install` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// nftables when `nft` is installed, else iptables.
    Auto,
    Nft,
    Iptables,
}

/// The firewall tools found on this host.
#[derive(Debug, Clone, Default)]
pub struct Tools {
    pub nft: Option<PathBuf>,
    pub iptables: Option<PathBuf>,
    pub ip6tables: Option<PathBuf>,
}

impl Tools {
    /// Looks in PATH, then the sbin directories a non-root PATH lacks.
    pub fn discover() -> Tools {
        Tools {
            nft: find_program("nft"),
            iptables: find_program("iptables"),
            ip6tables: find_program("ip6tables"),
        }
    }

    fn use_nft(&self, choice: BackendChoice) -> Result<bool, CaptureError> {
        match (choice, &self.nft, &self.iptables) {
            (BackendChoice::Nft, None, _) => Err(CaptureError::MissingTool {
                backend: "nft",
                program: "nft",
                package: "nftables",
            }),
            (BackendChoice::Iptables, _, None) => Err(CaptureError::MissingTool {
                backend: "iptables",
                program: "iptables",
                package: "iptables",
            }),
            (BackendChoice::Auto, None, None) => Err(CaptureError::NoTools),
            (BackendChoice::Iptables, _, _) | (BackendChoice::Auto, None, _) => Ok(false),
            _ => Ok(true),
        }
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Installs (or replaces) the capture rules; on the other backend, whatever
/// an earlier install left is removed, so exactly one set is in force.
pub fn install(cfg: &CaptureConfig, choice: BackendChoice) -> Result<Report, CaptureError> {
    cfg.validate()?;
    let tools = Tools::discover();
    let use_nft = tools.use_nft(choice)?;
    if !use_nft && cfg.ipv6 && tools.ip6tables.is_none() {
        return Err(CaptureError::MissingTool {
            backend: "iptables",
            program: "ip6tables",
            package: "iptables",
        });
    }
    need_net_admin()?;
    let mut tables = Vec::new();
    if use_nft {
        tables.push(nft_install(
            tools.nft.as_deref().unwrap_or(Path::new("nft")),
            cfg,
        )?);
        tables.extend(iptables_remove(&tools)?);
    } else {
        tables.extend(nft_remove(&tools)?);
        tables.push(ipt_install(&tools, Family::V4, cfg)?);
        if cfg.ipv6 {
            tables.push(ipt_install(&tools, Family::V6, cfg)?);
        } else {
            tables.extend(ipt_remove_family(&tools, Family::V6)?);
        }
    }
    Ok(Report::new(Action::Install, Some(cfg.clone()), tables))
}

/// Removes what crank-capture installed, on every backend found.
pub fn remove() -> Result<Report, CaptureError> {
    let tools = Tools::discover();
    tools.use_nft(BackendChoice::Auto)?;
    need_net_admin()?;
    let mut tables = nft_remove(&tools)?;
    tables.extend(iptables_remove(&tools)?);
    Ok(Report::new(Action::Remove, None, tables))
}

/// Lists what crank-capture installed, on every backend found.
pub fn show() -> Result<Report, CaptureError> {
    let tools = Tools::discover();
    tools.use_nft(BackendChoice::Auto)?;
    need_net_admin()?;
    let mut tables = Vec::new();
    if let Some(nft) = &tools.nft {
        let now = nft_listing(nft)?;
        tables.push(TableReport::nft(now.clone(), now));
    }
    for (family, prog) in [
        (Family::V4, &tools.iptables),
        (Family::V6, &tools.ip6tables),
    ] {
        if let Some(prog) = prog {
            let now = NatState::parse(&run(prog, &["-w", "5", "-t", "nat", "-S"], None)?);
            tables.push(TableReport::iptables(family, now.clone(), now));
        }
    }
    Ok(Report::new(Action::Show, None, tables))
}

fn need_net_admin() -> Result<(), CaptureError> {
    if crate::caps::have_net_admin() {
        Ok(())
    } else {
        Err(CaptureError::NoNetAdmin)
    }
}

fn nft_install(nft: &Path, cfg: &CaptureConfig) -> Result<TableReport, CaptureError> {
    let before = nft_listing(nft)?;
    run(nft, &["-f", "-"], Some(&nft::install_script(cfg)))?;
    Ok(TableReport::nft(before, nft_listing(nft)?))
}

fn nft_remove(tools: &Tools) -> Result<Vec<TableReport>, CaptureError> {
    let Some(nft) = &tools.nft else {
        return Ok(vec![]);
    };
    let before = nft_listing(nft)?;
    if before.is_some() {
        run(nft, &["-f", "-"], Some(&nft::remove_script()))?;
    }
    Ok(vec![TableReport::nft(before, nft_listing(nft)?)])
}

/// `nft list table inet crank`, or `None` when the table is absent.
fn nft_listing(nft: &Path) -> Result<Option<String>, CaptureError> {
    let tables = run(nft, &["list", "tables"], None)?;
    let want = format!("table {}", nft::TABLE);
    if !tables.lines().any(|l| l.trim() == want) {
        return Ok(None);
    }
    let (family, name) = nft::TABLE.split_once(' ').unwrap_or(("inet", "crank"));
    run(nft, &["list", "table", family, name], None).map(Some)
}

fn ipt_programs(tools: &Tools, family: Family) -> Option<(&Path, PathBuf)> {
    let prog = match family {
        Family::V4 => tools.iptables.as_deref()?,
        Family::V6 => tools.ip6tables.as_deref()?,
    };
    let mut restore = prog.as_os_str().to_owned();
    restore.push("-restore");
    Some((prog, PathBuf::from(restore)))
}

fn ipt_state(prog: &Path) -> Result<NatState, CaptureError> {
    Ok(NatState::parse(&run(
        prog,
        &["-w", "5", "-t", "nat", "-S"],
        None,
    )?))
}

fn ipt_install(
    tools: &Tools,
    family: Family,
    cfg: &CaptureConfig,
) -> Result<TableReport, CaptureError> {
    let Some((prog, restore)) = ipt_programs(tools, family) else {
        return Err(CaptureError::NoTools);
    };
    let before = ipt_state(prog)?;
    let script = iptables::install_script(cfg, family, &before);
    run(&restore, &["-w", "5", "--noflush"], Some(&script))?;
    Ok(TableReport::iptables(family, before, ipt_state(prog)?))
}

fn iptables_remove(tools: &Tools) -> Result<Vec<TableReport>, CaptureError> {
    let mut out = ipt_remove_family(tools, Family::V4)?;
    out.extend(ipt_remove_family(tools, Family::V6)?);
    Ok(out)
}

fn ipt_remove_family(tools: &Tools, family: Family) -> Result<Vec<TableReport>, CaptureError> {
    let Some((prog, restore)) = ipt_programs(tools, family) else {
        return Ok(vec![]);
    };
    let before = ipt_state(prog)?;
    if let Some(script) = iptables::remove_script(&before) {
        run(&restore, &["-w", "5", "--noflush"], Some(&script))?;
    }
    Ok(vec![TableReport::iptables(
        family,
        before,
        ipt_state(prog)?,
    )])
}

/// Runs `program args`, with `stdin` fed in; its stdout, or an error with
/// the command line and its stderr.
fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, CaptureError> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let spawn_err = |source| CaptureError::Spawn {
        program: program.display().to_string(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(CaptureError::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
