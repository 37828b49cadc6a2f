//! The fleet scenarios shared with the Vagrant VM fleet (`skiff_e2e::scenario`, run there by
//! `scripts/vm-e2e.sh`), here on the network-namespace fleet: 3 controllers, 3 agents.

use anyhow::Result;
use skiff_e2e::fleet::{Fleet, can_run, serial};
use skiff_e2e::scenario::{Expect, rolling_upgrade, run_all};

#[test]
fn s10_the_shared_fleet_scenarios_on_the_netns_fleet() -> Result<()> {
    if !can_run() {
        return Ok(());
    }
    let _serial = serial();
    let mut fleet = Fleet::start(3, 3, "")?;
    run_all(&mut fleet, &Expect::this_machine(), 3)?;
    // After node loss, a3 is off: the others upgrade in turn.
    let took = rolling_upgrade(&mut fleet, &["a1".to_owned(), "a2".to_owned()])?;
    eprintln!("a1 and a2 (with c1 and c2) upgraded in turn: {took:?}");
    Ok(())
}
