package policy

import (
	"fmt"
	"sort"
	"strings"
)

// Pos is a position in a policy file. Line and Col are 1-based; Col counts
// bytes, as compilers and editors jumping to FILE:LINE:COL expect.
type Pos struct {
	File string
	Line int
	Col  int
}

func (p Pos) String() string {
	if p.Line == 0 {
		return p.File
	}
	return fmt.Sprintf("%s:%d:%d", p.File, p.Line, p.Col)
}

// Severity says whether a Problem makes a policy invalid.
type Severity uint8

const (
	// SeverityError makes the policy invalid: it is rejected.
	SeverityError Severity = iota
	// SeverityWarning is a lint finding: the policy is valid but probably
	// not what its author meant.
	SeverityWarning
)

func (s Severity) String() string {
	if s == SeverityWarning {
		return "warning"
	}
	return "error"
}

// Problem is one thing wrong with a policy, at the position of the value
// that is wrong.
type Problem struct {
	Pos      Pos
	Severity Severity
	Msg      string
}

func (p Problem) String() string {
	if p.Severity == SeverityWarning {
		return fmt.Sprintf("%s: warning: %s", p.Pos, p.Msg)
	}
	return fmt.Sprintf("%s: %s", p.Pos, p.Msg)
}

// Error is returned when a policy is rejected. It lists every problem found,
// in file order, so that one run of `meshd policy check` shows them all.
type Error struct {
	Problems []Problem
}

func (e *Error) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

func sortProblems(ps []Problem) {
	sort.SliceStable(ps, func(i, j int) bool {
		a, b := ps[i].Pos, ps[j].Pos
		if a.Line != b.Line {
			return a.Line < b.Line
		}
		return a.Col < b.Col
	})
}
