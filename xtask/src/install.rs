//! `cargo xtask install [--root DIR]`: set up, build, then install the agent for this host:
//! the binary on the `PATH`, its man page and shell completions, the default config (only if
//! none is there) and the systemd unit (not enabled). `--root` installs under another
//! directory, as a package build would.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::artifacts::{self, Profile};
use crate::setup;
use crate::util::{cmd, output};

/// Where each installed file goes, below the install root.
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }
}

/// What was installed where, and what was left alone.
#[derive(Debug, Default, PartialEq)]
struct Report {
    installed: Vec<PathBuf>,
    kept: Vec<PathBuf>,
}

pub fn run(repo: &Path, root: Option<&Path>) -> Result<()> {
    setup::run()?;
    let built = artifacts::build(repo, Profile::Release)?;
    let generate = |args: &[&str]| {
        output(cmd(&built.agent).args(args))
            .with_context(|| format!("`mesh-agent {}` failed", args.join(" ")))
    };
    let files = Files {
        agent: built.agent.clone(),
        man: generate(&["man"])?,
        bash: generate(&["completion", "bash"])?,
        zsh: generate(&["completion", "zsh"])?,
        config: repo.join("config/mesh.toml"),
        unit: repo.join("deploy/mesh-agent.service"),
    };
    let layout = Layout {
        root: root.map_or_else(|| PathBuf::from("/"), Path::to_path_buf),
    };
    let report = install(&files, &layout)?;
    for path in &report.installed {
        println!("installed {}", path.display());
    }
    for path in &report.kept {
        println!("kept {} (already there)", path.display());
    }
    println!(
        "mesh-agent is on the PATH: `mesh-agent status`; run it as a service with \
         `systemctl daemon-reload && systemctl enable --now mesh-agent`"
    );
    Ok(())
}

/// The files to install: the binary, and what it and the repository provide.
struct Files {
    agent: PathBuf,
    man: String,
    bash: String,
    zsh: String,
    config: PathBuf,
    unit: PathBuf,
}

fn install(files: &Files, layout: &Layout) -> Result<Report> {
    let mut report = Report::default();
    let mut put = |path: PathBuf, write: &dyn Fn(&Path) -> std::io::Result<()>| -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write(&path).with_context(|| format!("writing {}", path.display()))?;
        report.installed.push(path);
        Ok(())
    };
    put(layout.at("/usr/local/bin/mesh-agent"), &|to| {
        // Beside, then renamed: a running agent's binary is replaced, never truncated.
        let aside = to.with_extension("new");
        std::fs::copy(&files.agent, &aside)?;
        set_mode(&aside, 0o755)?;
        std::fs::rename(&aside, to)
    })?;
    put(layout.at("/usr/local/share/man/man1/mesh-agent.1"), &|to| {
        std::fs::write(to, &files.man)
    })?;
    put(
        layout.at("/usr/local/share/bash-completion/completions/mesh-agent"),
        &|to| std::fs::write(to, &files.bash),
    )?;
    put(
        layout.at("/usr/local/share/zsh/site-functions/_mesh-agent"),
        &|to| std::fs::write(to, &files.zsh),
    )?;
    put(layout.at("/etc/systemd/system/mesh-agent.service"), &|to| {
        std::fs::copy(&files.unit, to).map(drop)
    })?;
    // An operator's config is never overwritten.
    let config = layout.at("/etc/mesh/mesh.toml");
    if config.exists() {
        report.kept.push(config);
    } else {
        put(config, &|to| std::fs::copy(&files.config, to).map(drop))?;
    }
    Ok(report)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_every_file_under_the_root_and_keeps_an_existing_config() {
        let dir = std::env::temp_dir().join(format!("mesh-xtask-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let source = dir.join("source");
        std::fs::create_dir_all(&source).unwrap();
        let file = |name: &str, text: &str| {
            let path = source.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let files = Files {
            agent: file("mesh-agent", "binary"),
            man: ".TH mesh-agent 1".into(),
            bash: "_mesh-agent() {}".into(),
            zsh: "#compdef mesh-agent".into(),
            config: file("mesh.toml", "[node]"),
            unit: file("mesh-agent.service", "[Unit]"),
        };
        let layout = Layout {
            root: dir.join("root"),
        };
        let first = install(&files, &layout).unwrap();
        assert_eq!(first.installed.len(), 6);
        assert!(first.kept.is_empty());
        let bin = layout.at("/usr/local/bin/mesh-agent");
        assert_eq!(std::fs::read_to_string(&bin).unwrap(), "binary");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );

        std::fs::write(layout.at("/etc/mesh/mesh.toml"), "mine").unwrap();
        let again = install(&files, &layout).unwrap();
        assert_eq!(again.kept, [layout.at("/etc/mesh/mesh.toml")]);
        assert_eq!(
            std::fs::read_to_string(layout.at("/etc/mesh/mesh.toml")).unwrap(),
            "mine"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
