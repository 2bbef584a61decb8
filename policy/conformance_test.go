package policy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// expectation is one "// want:" line of a conformance file.
type expectation struct {
	severity Severity
	pos      string // "LINE:COL"
	substr   string
}

var wantRE = regexp.MustCompile(`^\s*// want: (error|warning) (\d+:\d+) (".*")\s*$`)

// readExpectations returns the "// want:" lines of a conformance file and
// whether it declares "// want: ok" (valid, no warnings asked for).
func readExpectations(t *testing.T, src string) (wants []expectation, ok bool) {
	t.Helper()
	for line := range strings.Lines(src) {
		if strings.TrimSpace(line) == "// want: ok" {
			ok = true
			continue
		}
		if !strings.Contains(line, "// want:") {
			continue
		}
		m := wantRE.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("malformed want line %q: write // want: ok, or // want: error|warning LINE:COL \"substring\"", line)
		}
		sev := SeverityError
		if m[1] == "warning" {
			sev = SeverityWarning
		}
		substr, err := strconv.Unquote(m[3])
		if err != nil {
			t.Fatalf("want line %q: the substring is a Go string: %v", line, err)
		}
		wants = append(wants, expectation{severity: sev, pos: m[2], substr: substr})
	}
	if !ok && len(wants) == 0 {
		t.Fatal("a conformance file says what it expects: // want: ok or // want: error|warning lines")
	}
	return wants, ok
}

// TestConformance runs the corpus under testdata/conformance: policies
// written the way Tailscale's policy reference and headscale's policy tests
// describe them, each file stating what meshd must do with it. A file
// whose wants are only warnings must load (and fail --strict); a file with
// errors must be refused with exactly those errors, at those positions.
func TestConformance(t *testing.T) {
	files, err := filepath.Glob("testdata/conformance/*.hujson")
	if err != nil || len(files) == 0 {
		t.Fatalf("no conformance files: %v", err)
	}
	for _, file := range files {
		t.Run(strings.TrimSuffix(filepath.Base(file), ".hujson"), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			wants, _ := readExpectations(t, string(data))
			var wantErrs, wantWarns []expectation
			for _, w := range wants {
				if w.severity == SeverityError {
					wantErrs = append(wantErrs, w)
				} else {
					wantWarns = append(wantWarns, w)
				}
			}
			name := filepath.Base(file)
			p, err := Parse(name, data)
			var got []Problem
			switch {
			case err != nil:
				var perr *Error
				if !errors.As(err, &perr) {
					t.Fatalf("error without problems: %v", err)
				}
				got = perr.Problems
				if len(wantErrs) == 0 {
					t.Fatalf("refused, want it to load:\n%v", err)
				}
				if len(got) != len(wantErrs) {
					t.Errorf("%d problems, want %d:\n%v", len(got), len(wantErrs), err)
				}
			case len(wantErrs) > 0:
				t.Fatalf("loaded, want it refused with %d error(s)", len(wantErrs))
			default:
				got = p.Lint()
				// --strict turns each warning into a failure; with none
				// asked for, the file must lint clean of the outcomes this
				// corpus is about (ignored settings, unenforced sections).
				for _, pr := range got {
					if len(wantWarns) == 0 && (strings.Contains(pr.Msg, "is ignored") || strings.Contains(pr.Msg, "is not enforced")) {
						t.Errorf("unexpected warning: %v", pr)
					}
				}
			}
			for _, w := range append(wantErrs, wantWarns...) {
				if !hasProblem(got, name, w) {
					t.Errorf("want %s at %s:%s containing %q; got:\n%v", w.severity, name, w.pos, w.substr, (&Error{Problems: got}).Error())
				}
			}
		})
	}
}

func hasProblem(ps []Problem, file string, w expectation) bool {
	for _, pr := range ps {
		if pr.Severity == w.severity && pr.Pos.String() == fmt.Sprintf("%s:%s", file, w.pos) && strings.Contains(pr.Msg, w.substr) {
			return true
		}
	}
	return false
}

// TestCompatTableNamesCorpus: every corpus file the compatibility table in
// README.md names exists, and every corpus file is named there, so the
// table and the tests cannot drift apart.
func TestCompatTableNamesCorpus(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	named := map[string]bool{}
	for line := range strings.Lines(string(readme)) {
		cells := strings.Split(strings.TrimSpace(line), "|")
		if len(cells) != 6 || strings.HasPrefix(cells[1], "---") || strings.TrimSpace(cells[1]) == "construct" {
			continue
		}
		for f := range strings.SplitSeq(cells[4], ",") {
			if f = strings.TrimSpace(f); f != "" {
				named[f] = true
			}
		}
	}
	if len(named) == 0 {
		t.Fatal("README.md: no compatibility table with corpus files")
	}
	files, err := filepath.Glob("testdata/conformance/*.hujson")
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, f := range files {
		have[strings.TrimSuffix(filepath.Base(f), ".hujson")] = true
	}
	for f := range named {
		if !have[f] {
			t.Errorf("README.md names corpus file %q, which does not exist", f)
		}
	}
	for f := range have {
		if !named[f] {
			t.Errorf("corpus file %s.hujson is not named in README.md's table", f)
		}
	}
}
