pub fn dev(_t: &collector_e2e::Toolchain, _a: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
