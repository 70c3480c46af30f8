//! Tools for the packet fixtures and the benchmark, never used by the
//! daemon: `BPF_PROG_TEST_RUN`, the empty baseline programs, and direct
//! conntrack access.

use aya::programs::{TestRun, TestRunOptions};
use canary_common::{
    IPPROTO_UDP,
    flow::{CtEntry, FlowKey},
    names,
};

use super::{
    Dataplane, DataplaneError, Program,
    load::{classifier, load_program, xdp},
    map_error,
};

impl Dataplane {
    /// The conntrack entry for `key` (in its protocol's table), if any.
    pub fn conntrack_entry(&self, key: &FlowKey) -> Option<CtEntry> {
        if key.proto == IPPROTO_UDP {
            self.ct_udp.get(key, 0).ok()
        } else {
            self.conntrack.get(key, 0).ok()
        }
    }

    /// Number of conntrack entries, TCP and UDP (walks the maps; for tests
    /// and tools).
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().flatten().count() + self.ct_udp.keys().flatten().count()
    }

    /// Loads the benchmark's empty baseline programs (the agent never does).
    pub fn load_baselines(&mut self) -> Result<(), DataplaneError> {
        for program in [Program::BenchTcEmpty, Program::BenchXdpEmpty] {
            load_program(&mut self.ebpf, program)?;
        }
        Ok(())
    }

    /// Writes one conntrack entry as the programs would (for tools: the
    /// benchmark fills the table and builds steady-state flows with it).
    pub fn conntrack_insert(&mut self, key: FlowKey, entry: CtEntry) -> Result<(), DataplaneError> {
        if key.proto == IPPROTO_UDP {
            return self
                .ct_udp
                .insert(key, entry, 0)
                .map_err(|source| map_error(names::CT_UDP, "insert".to_string(), source));
        }
        self.conntrack
            .insert(key, entry, 0)
            .map_err(|source| map_error(names::CONNTRACK, "insert".to_string(), source))
    }

    /// Runs `program` once on `packet` through `BPF_PROG_TEST_RUN`; returns
    /// the verdict and the packet as the program left it.
    pub fn test_run(
        &mut self,
        program: Program,
        packet: &[u8],
    ) -> Result<(i32, Vec<u8>), DataplaneError> {
        let mut out = vec![0u8; packet.len() + 256];
        let result = self.test_run_repeat(program, packet, 1, Some(&mut out))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value.cast_signed(), out))
    }

    /// Runs `program` `repeat` times on one copy of `packet` (a rewrite by
    /// one run is what the next run sees); the result's duration is the
    /// kernel's mean per run.
    pub fn test_run_repeat(
        &mut self,
        program: Program,
        packet: &[u8],
        repeat: u32,
        out: Option<&mut [u8]>,
    ) -> Result<aya::programs::TestRunResult, DataplaneError> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = out;
        opts.repeat = repeat;
        let result = if program.is_xdp() {
            xdp(&mut self.ebpf, program.name())?.test_run(opts)
        } else {
            classifier(&mut self.ebpf, program.name())?.test_run(opts)
        };
        result.map_err(|source| DataplaneError::Program {
            name: program.name(),
            action: "BPF_PROG_TEST_RUN",
            source: Box::new(source),
        })
    }
}
