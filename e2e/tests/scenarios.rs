//! The fleet scenarios shared with the Vagrant VM fleet (`skiff_e2e::scenario`, run there by
//! `scripts/vm-e2e.sh`), here on the network-namespace fleet: 3 controllers, 3 agents.

use anyhow::Result;
use skiff_e2e::fleet::{Fleet, can_run, serial};
use skiff_e2e::scenario::{Expect, run_all};

#[test]
fn s10_the_shared_fleet_scenarios_on_the_netns_fleet() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    let mut fleet = Fleet::start(3, 3, "")?;
    run_all(&mut fleet, &Expect::this_machine(), 3)
}
