pub fn bench(_t: &collector_e2e::Toolchain) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
