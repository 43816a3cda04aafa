"""BCC's compiler output (loader.programs.bcc_compile): the kernel headers' warnings stay out
of install's and check's output (6.12's headers draw ~100 lines from Debian's clang 14), a
diagnostic in our own text is passed on, and a failed build names clang's first error."""
import pytest

from loader import programs


def test_a_clean_build_prints_nothing(capfd):
    programs.bcc_compile(b"int f(void *ctx) { return 0; }", programs.QUIET_CFLAGS)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_a_warning_in_our_own_text_is_passed_on(capfd):
    programs.bcc_compile(b"int f(void *ctx) { int a = 1 / 0; return 0; }", [])
    err = capfd.readouterr().err
    # all of clang's output then, the kernel headers' warnings too (6.12 has some)
    assert any(line.startswith(programs.OUR_TEXT) and "division by zero" in line
               for line in err.splitlines()), err


def test_a_failed_build_raises_with_the_first_error_line(capfd):
    with pytest.raises(Exception) as e:
        programs.bcc_compile(b"int f(void *ctx) { return y; }", [])
    first = str(e.value).splitlines()[0]
    assert first.startswith(programs.OUR_TEXT) and "undeclared identifier 'y'" in first
    assert capfd.readouterr().err == ""
