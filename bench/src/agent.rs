//! The agent's own cost: scrape time of /metrics with 1 000 services.

use std::time::Instant;

use anyhow::{Context, ensure};
use canary_lab::{AgentProcess, Behavior, Lab};
use canary_tests::{load::drive, metrics::try_http_get};
use serde::Serialize;

use crate::sample::{median, rss_mib};

/// Scrape figures.
#[derive(Clone, Debug, Serialize)]
pub struct Scrape {
    /// Services configured.
    pub services: usize,
    /// Services that had traffic (and so histograms with samples).
    pub with_traffic: usize,
    /// GET /metrics, median ms.
    pub median_ms: f64,
    /// Slowest scrape, ms.
    pub max_ms: f64,
    /// Response size, bytes.
    pub bytes: usize,
    /// Agent resident memory after the scrapes, MiB.
    pub rss_mib: f64,
}

/// Starts an agent with `services` services, drives a few connections to
/// `with_traffic` of them, then times `scrapes` GET /metrics.
pub fn scrape(services: usize, with_traffic: usize, scrapes: usize) -> anyhow::Result<Scrape> {
    let lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        8,
    );
    let vip = |i: usize| format!("10.96.{}.{}:80", i / 200, i % 200 + 1);
    let mut config = format!("[agent]\ninterfaces = [\"{}\"]\n", Lab::ROUTER_CLIENT_IFACE);
    for i in 0..services {
        config.push_str(&format!(
            "[[service]]\nname = \"svc{i}\"\nvip = \"{}\"\nstable = [\"{}\"]\ncanary = [\"{}\"]\n\
             weight = \"10%\"\ncohort = \"per-connection\"\n",
            vip(i),
            lab.backend_addr(0),
            lab.backend_addr(1)
        ));
    }
    let agent = AgentProcess::start(lab.router(), &config, false)?;
    for i in 0..with_traffic {
        let out = drive(&lab, vip(i).parse()?, lab.client_addrs(), 20);
        ensure!(
            out.errors.is_empty(),
            "traffic to {}: {:?}",
            vip(i),
            &out.errors[..1]
        );
    }
    let addr = "127.0.0.1:9477".parse()?;
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..scrapes {
        let t = Instant::now();
        let (head, body) =
            try_http_get(lab.router(), addr, "/metrics", "*/*").context("GET /metrics")?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(head.contains("200"), "GET /metrics: {head}");
        bytes = body.len();
    }
    let rss_mib = rss_mib(agent.pid());
    agent.stop()?;
    let max_ms = times.iter().copied().fold(0.0, f64::max);
    Ok(Scrape {
        services,
        with_traffic,
        median_ms: median(&mut times),
        max_ms,
        bytes,
        rss_mib,
    })
}
