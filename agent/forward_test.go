package agent

import (
	"slices"
	"testing"
)

func TestParseForwards(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []Forward
		err  bool
	}{
		{"", nil, false},
		{"8000=127.0.0.1:8000", []Forward{{8000, "127.0.0.1:8000"}}, false},
		{"80=8080, 22=[::1]:22", []Forward{{80, "127.0.0.1:8080"}, {22, "[::1]:22"}}, false},
		{"80=localhost:9000,", []Forward{{80, "localhost:9000"}}, false},
		{"80", nil, true},
		{"0=127.0.0.1:80", nil, true},
		{"70000=127.0.0.1:80", nil, true},
		{"80=127.0.0.1", nil, true},
		{"80=127.0.0.1:0", nil, true},
		{"80=:99", nil, true},
		{"80=1,80=2", nil, true},
	} {
		got, err := ParseForwards(tc.in)
		if (err != nil) != tc.err || !slices.Equal(got, tc.want) {
			t.Errorf("ParseForwards(%q) = %v, %v", tc.in, got, err)
		}
	}
}

func FuzzParseForwards(f *testing.F) {
	f.Add("8000=127.0.0.1:8000")
	f.Add("80=8080, 22=[::1]:22")
	f.Add("1=a:1,2=b:2,,")
	f.Fuzz(func(t *testing.T, s string) {
		fs, err := ParseForwards(s)
		if err != nil {
			return
		}
		for _, f := range fs {
			if f.Port == 0 || f.Target == "" {
				t.Fatalf("accepted bad forward %+v from %q", f, s)
			}
		}
	})
}
