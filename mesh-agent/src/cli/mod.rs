//! The command line: every command but `run` is a tool around the daemon. `check` validates a
//! config; `status`, `services`, `endpoints`, `nodes`, `policies`, `certs` and `flows` ask a
//! running agent over its admin socket and print its answer ([`tables`]); `register` and
//! `deregister` announce endpoints through it; `ca` and `cert` make a trust domain's
//! credentials; `uninstall` removes a node's data plane ([`uninstall`]). See the README's CLI
//! reference.

pub mod check;
pub mod render;
pub mod sysdump;
pub mod tables;
pub mod uninstall;

use std::path::PathBuf;

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::{admin, app, config, dataplane, model, telemetry::flows, tunnel, VERSION};

#[derive(Parser)]
#[command(
    name = "mesh-agent",
    version = VERSION,
    about = "Sidecarless service mesh agent",
    long_about = "Sidecarless service mesh agent: `run` is the daemon; every other command \
                  asks a running agent over its admin socket or works on files.",
    propagate_version = true
)]
pub struct Cli {
    /// Format of the agent's own log on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, display_order = 900)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per event.
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the data plane, apply the config and follow it until SIGTERM.
    Run(app::RunOptions),
    /// Validate a config file and the certificate files it names (they load, the keys match,
    /// the chains verify); warn about VIPs that are addresses of this host.
    Check {
        /// The config file (TOML) to check.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show the verdict (ok / degraded, and why), node, services with their health, and the
    /// kernel counters of the running agent.
    Status(Query),
    /// List services: frontend, policy, backends, how many are healthy.
    Services(Query),
    /// List every backend with its state, health and connection count.
    Endpoints(Query),
    /// List the nodes this agent knows.
    Nodes(Query),
    /// Announce an endpoint this node hosts, without a config edit (kept across agent
    /// restarts in <state-dir>/<node>/registrations.json).
    Register {
        #[command(flatten)]
        endpoint: EndpointArgs,
        /// Relative weight, 0 (drained) to 10000.
        #[arg(short, long, default_value_t = 1)]
        weight: u32,
    },
    /// Withdraw an endpoint announced with `register`.
    Deregister(EndpointArgs),
    /// List the authorization policies in force (none without [mtls]).
    Policies(Query),
    /// List the certificates loaded: identity, expiry, serial (none without [mtls]).
    Certs(Query),
    /// Manage a trust domain's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue workload and node certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Show recent balancing decisions; with --follow, stream new ones.
    Flows(FlowsArgs),
    /// Detach the programs and remove the pinned state of a node.
    Uninstall {
        /// Node name [default: the config's [node] name, else the host name].
        #[arg(short, long)]
        node: Option<String>,
        /// Config file to read the node name from.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// bpffs mount; the node's pins are under <bpffs>/mesh/<node>/.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// The agent's state directory; <state-dir>/<node>/ is removed.
        #[arg(long, default_value = "/var/lib/mesh")]
        state_dir: PathBuf,
        /// Admin socket to remove when the agent recorded none.
        #[arg(short = 's', long, default_value_os_t = app::default_admin_socket().to_path_buf())]
        admin_socket: PathBuf,
        /// Remove even while an agent serves the node (its data plane goes from under it).
        #[arg(long)]
        force: bool,
    },
    /// Change the running agent's log filter (`RUST_LOG` syntax: `debug`,
    /// `info,mesh_agent::gossip=debug`) until it restarts.
    LogLevel {
        /// The new filter.
        filter: String,
        /// The running agent's admin socket.
        #[arg(short = 's', long, default_value_os_t = app::default_admin_socket().to_path_buf())]
        admin_socket: PathBuf,
    },
    /// Write one archive for a bug report: every admin answer, recent flows, the config, map
    /// fill, the agent's recent log and the versions (no keys).
    Sysdump {
        /// The running agent's admin socket.
        #[arg(short = 's', long, default_value_os_t = app::default_admin_socket().to_path_buf())]
        admin_socket: PathBuf,
        /// The agent's metrics address (map fill).
        #[arg(long, default_value = "127.0.0.1:15020")]
        metrics_addr: std::net::SocketAddr,
        /// The archive to write [default: mesh-sysdump-<unix time>.tar.gz here].
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
    },
    /// Print a shell completion script (e.g. `mesh-agent completion bash >
    /// /etc/bash_completion.d/mesh-agent`).
    Completion {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; e.g. `mesh-agent man | man -l -`).
    Man,
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a new CA for a trust domain: writes its certificate and key (mode 0600).
    Init {
        /// The trust domain, e.g. `prod.example.com`.
        #[arg(short, long)]
        trust_domain: String,
        /// Where to write the CA certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the CA key (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u64,
        /// Replace an existing CA at these paths (every certificate it issued stops verifying).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum CertCommand {
    /// Issue a certificate for a SPIFFE ID (spiffe://<td>/ns/<ns>/sa/<account>), signed by the CA.
    Issue {
        /// The CA certificate (PEM) that signs it.
        #[arg(long)]
        ca_cert: PathBuf,
        /// The CA key (PEM).
        #[arg(long)]
        ca_key: PathBuf,
        /// The identity the certificate carries; its trust domain must be the CA's.
        #[arg(short = 'i', long)]
        spiffe_id: String,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Where to write its key (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 30)]
        days: u64,
    },
}

/// How to reach the agent and how to print its answer.
#[derive(Args)]
pub struct Query {
    /// The running agent's admin socket.
    #[arg(short = 's', long, default_value_os_t = app::default_admin_socket().to_path_buf())]
    admin_socket: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// One endpoint of a service, on the running agent.
#[derive(Args)]
pub struct EndpointArgs {
    #[command(flatten)]
    query: Query,
    /// The service's name (it may be defined on another node).
    #[arg(long)]
    service: String,
    /// The endpoint's IP:port.
    #[arg(short, long)]
    address: std::net::SocketAddr,
}

#[derive(Args)]
pub struct FlowsArgs {
    #[command(flatten)]
    query: Query,
    /// Keep streaming new flows until interrupted.
    #[arg(short, long)]
    follow: bool,
    /// Only flows of this service.
    #[arg(long)]
    service: Option<String>,
    /// Only flows with this verdict.
    #[arg(long, value_enum)]
    verdict: Option<Verdict>,
    /// Only flows from clients whose identity (cgroup path) starts with this.
    #[arg(long)]
    identity: Option<String>,
    /// How many recent flows to show first.
    #[arg(short = 'n', long, default_value_t = 100)]
    limit: usize,
}

/// A kernel decision, as flows, counters and metrics name it.
#[derive(Clone, Copy, PartialEq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Verdict {
    /// Balanced: the connect or datagram went to a backend.
    Forwarded,
    /// Sent to the local agent's outbound listener (a strict mTLS service).
    MtlsRedirected,
    /// Refused: the VIP has no service on that port and protocol.
    NoServicePort,
    /// Refused: the service has no backend.
    NoBackend,
    /// Refused: a slot of the table was missing (a map mid-update or damaged).
    SlotMissing,
    /// Refused: a strict mTLS service with no agent listening on this node.
    MtlsNoAgent,
}

impl Verdict {
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// Aligned columns, with the wide ones too.
    Wide,
    /// The admin API's JSON answer.
    Json,
    /// The same answer as YAML.
    Yaml,
}

pub fn execute(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let show = |query: &Query, path: &str, render: &dyn Fn(&serde_json::Value, bool) -> String| {
        runtime.block_on(async {
            let value: serde_json::Value = admin::client::fetch(&query.admin_socket, path).await?;
            print_output(query.output, &value, render)
        })
    };
    match command {
        Command::Run(options) => runtime.block_on(app::run(options)),
        Command::Check { config } => {
            let checked = check::check(&config)?;
            print!("{}", checked.report);
            for warning in &checked.warnings {
                eprintln!("warning: {warning}");
            }
            Ok(())
        }
        Command::Status(query) => show(&query, "/v1/status", &|v, wide| {
            typed(v, |report: admin::types::StatusReport| report.render(wide))
        }),
        Command::Services(query) => show(&query, "/v1/services", &|v, wide| {
            typed(v, |s: Vec<admin::types::ServiceStatus>| {
                tables::render_services(&s, wide)
            })
        }),
        Command::Endpoints(query) => show(&query, "/v1/endpoints", &|v, wide| {
            typed(v, |e: Vec<admin::types::EndpointStatus>| {
                tables::render_endpoints(&e, wide)
            })
        }),
        Command::Nodes(query) => show(&query, "/v1/nodes", &|v, wide| {
            typed(v, |n: Vec<admin::types::NodeStatus>| {
                tables::render_nodes(&n, wide)
            })
        }),
        Command::Register { endpoint, weight } => {
            runtime.block_on(change_endpoint("register", &endpoint, Some(weight)))
        }
        Command::Deregister(endpoint) => {
            runtime.block_on(change_endpoint("deregister", &endpoint, None))
        }
        Command::Policies(query) => show(&query, "/v1/policies", &|v, wide| {
            typed(v, |p: Vec<admin::types::PolicyStatus>| {
                tables::render_policies(&p, wide)
            })
        }),
        Command::Certs(query) => show(&query, "/v1/certs", &|v, wide| {
            typed(v, |c: Vec<tunnel::identity::certs::CertStatus>| {
                tables::render_certs(&c, wide)
            })
        }),
        Command::Ca(CaCommand::Init {
            trust_domain,
            cert,
            key,
            days,
            force,
        }) => {
            let pem = tunnel::identity::ca::init(
                &trust_domain,
                std::time::Duration::from_secs(days * 86_400),
            )?;
            let existing = if force {
                tunnel::identity::ca::Existing::Replace
            } else {
                tunnel::identity::ca::Existing::Refuse
            };
            tunnel::identity::ca::write(&pem, &cert, &key, existing)?;
            println!(
                "CA for trust domain {trust_domain}: {} (key {})",
                cert.display(),
                key.display()
            );
            Ok(())
        }
        Command::Cert(CertCommand::Issue {
            ca_cert,
            ca_key,
            spiffe_id,
            cert,
            key,
            days,
        }) => {
            let read = |path: &PathBuf| {
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
            };
            let ca = tunnel::identity::ca::Pem {
                cert: read(&ca_cert)?,
                key: read(&ca_key)?,
            };
            let id: model::identity::SpiffeId = spiffe_id.parse()?;
            let pem = tunnel::identity::ca::issue(
                &ca,
                &id,
                std::time::Duration::from_secs(days * 86_400),
            )?;
            tunnel::identity::ca::write(
                &pem,
                &cert,
                &key,
                tunnel::identity::ca::Existing::Replace,
            )?;
            println!("{id}: {} (key {})", cert.display(), key.display());
            Ok(())
        }
        Command::Flows(args) => runtime.block_on(flows(args)),
        Command::LogLevel {
            filter,
            admin_socket,
        } => runtime.block_on(async {
            let query = serde_urlencoded::to_string(admin::LogLevelQuery {
                filter: filter.clone(),
            })?;
            let _: admin::Changed =
                admin::client::post(&admin_socket, &format!("/v1/log-level?{query}")).await?;
            println!("log filter now {filter}");
            Ok(())
        }),
        Command::Sysdump {
            admin_socket,
            metrics_addr,
            file,
        } => runtime.block_on(async {
            let path = sysdump::Sysdump {
                admin_socket: &admin_socket,
                metrics: metrics_addr,
                output: file,
            }
            .write()
            .await?;
            println!("wrote {}", path.display());
            Ok(())
        }),
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "mesh-agent",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Uninstall {
            node,
            config,
            bpffs,
            state_dir,
            admin_socket,
            force,
        } => {
            let config = config.map(|path| config::Config::load(&path)).transpose()?;
            let node = app::node_name(node.as_deref(), config.as_ref())?;
            let target = uninstall::Target {
                pins: dataplane::PinDir::new(&bpffs, &node),
                state: state_dir.join(&node),
                node: node.clone(),
                admin_socket,
                force,
            };
            let removed = uninstall::uninstall(&target)?;
            if removed.is_empty() {
                println!("nothing to remove for node {node}: no pins, admin socket or state");
            }
            for path in removed {
                println!("removed {}", path.display());
            }
            Ok(())
        }
    }
}

/// Prints `value` as JSON, YAML, or through `render` (told whether to show wide columns).
fn print_output(
    output: Output,
    value: &serde_json::Value,
    render: &dyn Fn(&serde_json::Value, bool) -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", yaml_serde::to_string(value)?),
        Output::Table => print!("{}", render(value, false)),
        Output::Wide => print!("{}", render(value, true)),
    }
    Ok(())
}

/// Renders a JSON answer through its typed form; an answer of another shape is shown as JSON.
fn typed<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
    render: impl Fn(T) -> String,
) -> String {
    match serde_json::from_value::<T>(value.clone()) {
        Ok(typed) => render(typed),
        Err(_) => format!("{value:#}\n"),
    }
}

/// `register` / `deregister`: one POST, then what changed.
async fn change_endpoint(
    action: &str,
    args: &EndpointArgs,
    weight: Option<u32>,
) -> anyhow::Result<()> {
    let query = serde_urlencoded::to_string(admin::EndpointQuery {
        service: args.service.clone(),
        address: args.address,
        weight,
    })?;
    let path = format!("/v1/endpoints/{action}?{query}");
    let answer: admin::Changed = admin::client::post(&args.query.admin_socket, &path).await?;
    let value = serde_json::to_value(&answer)?;
    print_output(args.query.output, &value, &|_, _| {
        let what = format!("{} {}", args.service, args.address);
        match (action, answer.changed) {
            ("register", true) => format!("registered {what}\n"),
            ("register", false) => format!("{what} was already registered with that weight\n"),
            (_, true) => format!("deregistered {what}\n"),
            (_, false) => format!("{what} was not registered\n"),
        }
    })
}

async fn flows(args: FlowsArgs) -> anyhow::Result<()> {
    let query = admin::FlowQuery {
        filter: flows::FlowFilter {
            service: args.service,
            verdict: args.verdict.map(Verdict::name),
            identity: args.identity,
        },
        limit: Some(args.limit),
        follow: args.follow,
    };
    let output = args.query.output;
    let wide = output == Output::Wide;
    if !args.follow {
        let mut history = Vec::new();
        admin::client::flows(&args.query.admin_socket, &query, |flow| history.push(flow)).await?;
        return match output {
            Output::Table | Output::Wide => {
                print!(
                    "{}",
                    render::table(&FLOW_COLUMNS, history.iter().map(flow_row), wide)
                );
                Ok(())
            }
            Output::Json => {
                history
                    .iter()
                    .for_each(|flow| println!("{}", json_line(flow)));
                Ok(())
            }
            Output::Yaml => {
                print!("{}", yaml_serde::to_string(&history)?);
                Ok(())
            }
        };
    }
    let mut stream = render::Stream::new(&FLOW_COLUMNS, wide);
    admin::client::flows(&args.query.admin_socket, &query, |flow| match output {
        Output::Table | Output::Wide => print!("{}", stream.row(flow_row(&flow))),
        Output::Json => println!("{}", json_line(&flow)),
        Output::Yaml => print!("---\n{}", yaml_serde::to_string(&flow).unwrap_or_default()),
    })
    .await?;
    Ok(())
}

/// The columns of `flows`, each with the width a streamed row keeps it to at least.
const FLOW_COLUMNS: [render::Column; 9] = [
    render::col("TIME").width(24),
    render::col("SERVICE").width(10),
    render::col("CALL").width(7),
    render::col("FRONTEND").width(21),
    render::col("BACKEND").width(21),
    render::col("VERDICT").width(15),
    render::col("IDENTITY"),
    render::wide("PROTO"),
    render::wide("AFFINITY"),
];

fn flow_row(flow: &flows::Flow) -> Vec<String> {
    vec![
        flow.time.clone(),
        flow.service.clone().unwrap_or_default(),
        flow.call.clone(),
        flow.frontend.clone(),
        flow.backend.clone().unwrap_or_default(),
        flow.verdict.clone(),
        flow.identity.clone(),
        flow.protocol.clone(),
        flow.affinity.clone(),
    ]
}

fn json_line(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
