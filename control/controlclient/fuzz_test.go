package controlclient

import (
	"bytes"
	"encoding/binary"
	"testing"
)

func frameOf(body string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	return append(b, body...)
}

// FuzzReadFrame feeds arbitrary bytes to the map stream reader: it must
// return messages or an error, never panic, and what it accepts must
// survive re-encoding.
func FuzzReadFrame(f *testing.F) {
	f.Add(frameOf(`{"epoch":"e","version":1,"keep_alive":true}`))
	f.Add(frameOf(`{"epoch":"e","version":2,"peers_removed":[3]}`))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, '{'})
	f.Add([]byte{0, 0, 0, 0})
	f.Add(append(frameOf(`{"epoch":"e","version":1}`), 0, 0, 0, 9, '{'))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		var buf []byte
		for range 16 {
			resp, b, err := ReadMapResponse(r, buf)
			buf = b
			if err != nil {
				return
			}
			fr, err := EncodeFrame(resp)
			if err != nil {
				t.Fatalf("re-encode accepted message: %v", err)
			}
			if _, _, err := ReadMapResponse(bytes.NewReader(fr), nil); err != nil {
				t.Fatalf("re-read of re-encoded message: %v", err)
			}
		}
	})
}

// FuzzParseAuthKey checks the auth key and admin token parsers.
func FuzzParseAuthKey(f *testing.F) {
	fp := "b44fb823ee0f25e298dceb395ddb237c0caf777c7a10ffa1bafade7f0acaaba0"
	f.Add("mskey-4d050af5bb5e-5knzhhyp5rpzegas6tp23jmzhdmzpsca-" + fp)
	f.Add("msadm-5knzhhyp5rpzegas6tp23jmzhdmzpsca-" + fp)
	f.Add("mskey---")
	f.Add("mskey-\x00-\xff-" + fp)
	f.Fuzz(func(t *testing.T, s string) {
		if k, err := ParseAuthKey(s); err == nil {
			if len(k.Fingerprint) != FingerprintLen || len(k.ID) != KeyIDLen {
				t.Fatalf("accepted %q with parts %+v", s, k)
			}
			if again, err := ParseAuthKey(k.String()); err != nil || again != k {
				t.Fatalf("round trip of %q: %+v %v", s, again, err)
			}
		}
		if fp, err := AdminTokenFingerprint(s); err == nil && len(fp) != FingerprintLen {
			t.Fatalf("admin token %q gave fingerprint %q", s, fp)
		}
	})
}
