import subprocess
import sys


def test_importing_the_package_skips_heavy_optional_dependencies():
    code = (
        "import sys\n"
        "import paretoslim.search, paretoslim.spaces, paretoslim.evaluators, "
        "paretoslim.kernels\n"
        "heavy = [m for m in ('ray', 'plotly', 'transformers', 'matplotlib', 'kaleido') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == ""
