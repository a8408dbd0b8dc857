use std::process::ExitCode;

use clap::Parser;
use keyward::cli::{Cli, Command, connect};
use keyward::{controller, error, runtime, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyward: {}", error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> error::Result<()> {
    match cli.command {
        Command::Crds { kube_version } => {
            print!("{}", keyward::api::crds_yaml(kube_version)?);
            Ok(())
        }
        Command::ApiReference => {
            print!("{}", keyward::api::api_reference_markdown()?);
            Ok(())
        }
        Command::Status { namespace, all_namespaces, name } => {
            let (client, server) = connect(cli.kubeconfig.as_ref(), cli.context.as_deref()).await?;
            runtime::ensure_crds(&client, &server).await?;
            print!(
                "{}",
                keyward::ops::status(client, namespace.as_deref(), all_namespaces, name.as_deref()).await?
            );
            Ok(())
        }
        Command::Rotate { namespace, name } => {
            let (client, server) = connect(cli.kubeconfig.as_ref(), cli.context.as_deref()).await?;
            runtime::ensure_crds(&client, &server).await?;
            print!("{}", keyward::ops::rotate(client, namespace.as_deref(), &name).await?);
            Ok(())
        }
        Command::Revoke { namespace, name, key_id } => {
            let (client, server) = connect(cli.kubeconfig.as_ref(), cli.context.as_deref()).await?;
            runtime::ensure_crds(&client, &server).await?;
            print!("{}", keyward::ops::revoke(client, namespace.as_deref(), &name, &key_id).await?);
            Ok(())
        }
        Command::Verifier {
            listen,
            grpc_listen,
            namespace,
            usage_flush_interval,
            max_staleness,
            shutdown_delay,
        } => {
            telemetry::init();
            let (client, server) = connect(cli.kubeconfig.as_ref(), cli.context.as_deref()).await?;
            let opts = keyward::verifier::Options {
                listen,
                grpc_listen,
                namespace,
                usage_interval: usage_flush_interval,
                max_staleness,
                shutdown_delay,
            };
            keyward::verifier::run(client, &server, opts).await
        }
        Command::Controller {
            metrics_addr,
            namespace,
            leader_elect,
            lease_name,
            lease_namespace,
            lease_duration,
            concurrency,
            usage_flush_interval,
            watch_consumers,
            watch_label_selector,
            manage_policies,
        } => {
            let (shard, manage_policies) =
                keyward::cli::sharding(namespace.as_deref(), watch_label_selector, manage_policies)
                    .map_err(keyward::error::Error::Config)?;
            let leader = leader_elect.then(|| {
                keyward::cli::lease_config(
                    namespace.as_deref(),
                    shard.as_deref(),
                    lease_name,
                    lease_namespace,
                    lease_duration,
                )
            });
            telemetry::init();
            let (client, server) = connect(cli.kubeconfig.as_ref(), cli.context.as_deref()).await?;
            controller::run(
                client,
                &server,
                controller::Options {
                    metrics_addr,
                    namespace,
                    leader,
                    concurrency,
                    usage_flush_interval,
                    watch_consumers,
                    shard,
                    manage_policies,
                },
            )
            .await
        }
    }
}
