package controlclient

import (
	"strings"
	"testing"
)

func TestParseURLs(t *testing.T) {
	for _, tc := range []struct {
		in    string
		hosts []string
		err   string
	}{
		{"https://a:1", []string{"a:1"}, ""},
		{"a:1", []string{"a:1"}, ""},
		{"https://a:1,https://b:2", []string{"a:1", "b:2"}, ""},
		{" a:1 , b:2 ", []string{"a:1", "b:2"}, ""},
		{"a:1,", nil, "empty entry"},
		{",a:1", nil, "empty entry"},
		{"a:1,a:1", nil, "listed twice"},
		{"a:1,http://b:2", nil, "only speaks https"},
		{"", nil, "empty"},
	} {
		us, err := ParseURLs(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseURLs(%q): %v, want an error containing %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseURLs(%q): %v", tc.in, err)
			continue
		}
		var hosts []string
		for _, u := range us {
			hosts = append(hosts, u.Host)
		}
		if strings.Join(hosts, " ") != strings.Join(tc.hosts, " ") {
			t.Errorf("ParseURLs(%q) = %v, want %v", tc.in, hosts, tc.hosts)
		}
	}
}
