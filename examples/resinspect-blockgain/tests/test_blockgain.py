from resinspect.testing import run_plugin


def test_blockgain_measures_every_block():
    section = run_plugin("blockgain", model="resnet20", epochs=1)
    assert len(section.tables[0].rows) == 9
    assert all(v > 0 for v in section.metrics.values())


def test_blockgain_on_a_plain_network():
    section = run_plugin("blockgain", model="plain20", epochs=0)
    assert section.findings[0].text.startswith("No residual blocks")
