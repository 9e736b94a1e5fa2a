//! The command line: every command but `run` is a tool around the daemon. `check` validates a
//! config; `status`, `services`, `endpoints`, `nodes`, `policies`, `certs` and `flows` ask a
//! running agent over its admin socket and print its answer ([`tables`]); `register` and
//! `deregister` announce endpoints through it; `ca` and `cert` make a trust domain's
//! credentials; `uninstall` removes a node's data plane ([`uninstall`]). See the README's CLI
//! reference.

pub mod tables;
pub mod uninstall;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::{admin, app, config, dataplane, telemetry::flows, tunnel, VERSION};

#[derive(Parser)]
#[command(name = "mesh-agent", version = VERSION, about = "Sidecarless service mesh agent")]
pub struct Cli {
    /// Log format of the agent's own log (stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the data plane, apply the config and follow it until SIGTERM.
    Run(app::RunOptions),
    /// Validate a config file and exit.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show node, services, backends and kernel counters of the running agent.
    Status(Query),
    /// List services.
    Services(Query),
    /// List every backend with its state and connection count.
    Endpoints(Query),
    /// List the nodes this agent knows.
    Nodes(Query),
    /// Announce an endpoint this node hosts, without a config edit (kept across agent
    /// restarts in <state-dir>/<node>/registrations.json).
    Register {
        #[command(flatten)]
        endpoint: EndpointArgs,
        /// Relative weight, 0 (drained) to 10000.
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Withdraw an endpoint announced with `register`.
    Deregister(EndpointArgs),
    /// List the authorization policies in force (none without [mtls]).
    Policies(Query),
    /// List the certificates loaded: identity, serial, expiry (none without [mtls]).
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
        #[arg(long)]
        node: Option<String>,
        /// Config file to read the node name from.
        #[arg(long)]
        config: Option<PathBuf>,
        /// bpffs mount; the node's pins are under <bpffs>/mesh/<node>/.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// The agent's state directory; <state-dir>/<node>/ is removed.
        #[arg(long, default_value = "/var/lib/mesh")]
        state_dir: PathBuf,
        /// Admin socket to remove when the agent recorded none.
        #[arg(long, default_value_os_t = app::default_admin_socket().to_path_buf())]
        admin_socket: PathBuf,
        /// Remove even while an agent serves the node (its data plane goes from under it).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a new CA for a trust domain: writes its certificate and key (mode 0600).
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
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
        #[arg(long)]
        ca_cert: PathBuf,
        #[arg(long)]
        ca_key: PathBuf,
        #[arg(long)]
        spiffe_id: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value_t = 30)]
        days: u64,
    },
}

/// How to reach the agent and how to print its answer.
#[derive(Args)]
pub struct Query {
    #[arg(long, default_value_os_t = app::default_admin_socket().to_path_buf())]
    admin_socket: PathBuf,
    #[arg(long, value_enum, default_value_t = Output::Table)]
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
    #[arg(long)]
    address: std::net::SocketAddr,
}

#[derive(Args)]
pub struct FlowsArgs {
    #[command(flatten)]
    query: Query,
    /// Keep streaming new flows until interrupted.
    #[arg(long)]
    follow: bool,
    /// Only flows of this service.
    #[arg(long)]
    service: Option<String>,
    /// Only flows with this verdict: forwarded, no_backend, no_service_port, slot_missing.
    #[arg(long)]
    verdict: Option<String>,
    /// Only flows from clients whose identity (cgroup path) starts with this.
    #[arg(long)]
    identity: Option<String>,
    /// How many recent flows to show first.
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn execute(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let show = |query: &Query, path: &str, render: &dyn Fn(&serde_json::Value) -> String| {
        runtime.block_on(async {
            let value: serde_json::Value = admin::client::fetch(&query.admin_socket, path).await?;
            print_output(query.output, &value, render)
        })
    };
    match command {
        Command::Run(options) => runtime.block_on(app::run(options)),
        Command::Check { config } => {
            let parsed = config::Config::load(&config)?;
            println!(
                "{}: ok ({} services)",
                config.display(),
                parsed.services.len()
            );
            Ok(())
        }
        Command::Status(query) => show(&query, "/v1/status", &|v| {
            typed(v, |report: admin::types::StatusReport| report.render())
        }),
        Command::Services(query) => show(&query, "/v1/services", &|v| {
            typed(v, |s: Vec<admin::types::ServiceStatus>| {
                tables::render_services(&s)
            })
        }),
        Command::Endpoints(query) => show(&query, "/v1/endpoints", &|v| {
            typed(v, |e: Vec<admin::types::EndpointStatus>| {
                tables::render_endpoints(&e)
            })
        }),
        Command::Nodes(query) => show(&query, "/v1/nodes", &|v| {
            typed(v, |n: Vec<admin::types::NodeStatus>| {
                tables::render_nodes(&n)
            })
        }),
        Command::Register { endpoint, weight } => {
            runtime.block_on(change_endpoint("register", &endpoint, Some(weight)))
        }
        Command::Deregister(endpoint) => {
            runtime.block_on(change_endpoint("deregister", &endpoint, None))
        }
        Command::Policies(query) => show(&query, "/v1/policies", &|v| {
            typed(v, |p: Vec<tunnel::authz::policy::PolicyStatus>| {
                tables::render_policies(&p)
            })
        }),
        Command::Certs(query) => show(&query, "/v1/certs", &|v| {
            typed(v, |c: Vec<tunnel::identity::certs::CertStatus>| {
                tables::render_certs(&c)
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
            let id: tunnel::identity::spiffe::SpiffeId = spiffe_id.parse()?;
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

/// Prints `value` as JSON or through `render`.
fn print_output(
    output: Output,
    value: &serde_json::Value,
    render: &dyn Fn(&serde_json::Value) -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Table => print!("{}", render(value)),
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
    print_output(args.query.output, &value, &|_| {
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
            verdict: args.verdict,
            identity: args.identity,
        },
        limit: Some(args.limit),
        follow: args.follow,
    };
    let output = args.query.output;
    let mut header_printed = false;
    admin::client::flows(&args.query.admin_socket, &query, |flow| {
        print_flow(output, &flow, &mut header_printed);
    })
    .await?;
    Ok(())
}

fn print_flow(output: Output, flow: &flows::Flow, header_printed: &mut bool) {
    if output == Output::Json {
        println!("{}", json_line(flow));
        return;
    }
    if !*header_printed {
        println!(
            "{:<24} {:<10} {:<7} {:<22} {:<22} {:<16} IDENTITY",
            "TIME", "SERVICE", "CALL", "VIP", "BACKEND", "VERDICT"
        );
        *header_printed = true;
    }
    println!(
        "{:<24} {:<10} {:<7} {:<22} {:<22} {:<16} {}",
        flow.time, flow.service, flow.call, flow.vip, flow.backend, flow.verdict, flow.identity
    );
}

fn json_line(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
