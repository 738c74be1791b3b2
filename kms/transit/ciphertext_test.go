package transit_test

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/kms/keystore"
	"github.com/cairnkms/cairn/kms/transit"
)

// tinkCT is a ciphertext-shaped byte string with a Tink prefix naming id.
func tinkCT(id uint32, body string) []byte {
	return append([]byte{0x01, byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id)}, body...)
}

func TestFormatCiphertext(t *testing.T) {
	for _, tc := range []struct {
		ct   []byte
		want string
	}{
		{tinkCT(1, "x"), "vault:v1:" + base64.StdEncoding.EncodeToString(tinkCT(1, "x"))},
		{tinkCT(0xffffffff, "body"), "vault:v4294967295:" + base64.StdEncoding.EncodeToString(tinkCT(0xffffffff, "body"))},
		{tinkCT(0, ""), "vault:v0:AQAAAAA="},
	} {
		got, err := transit.FormatCiphertext(tc.ct)
		if err != nil || got != tc.want {
			t.Errorf("FormatCiphertext(%x) = %q, %v, want %q", tc.ct, got, err, tc.want)
		}
		back, v, err := transit.ParseCiphertext(got)
		if id, _ := keystore.KeyIDOf(tc.ct); err != nil || !bytes.Equal(back, tc.ct) || v != id {
			t.Errorf("ParseCiphertext(%q) = %x, %d, %v, want %x, %d", got, back, v, err, tc.ct, id)
		}
	}
	for _, ct := range [][]byte{nil, {}, {0x01, 0, 0, 0}, {0x00, 0, 0, 0, 1, 2}, []byte("not a tink ciphertext")} {
		if got, err := transit.FormatCiphertext(ct); !errors.Is(err, transit.ErrCiphertext) {
			t.Errorf("FormatCiphertext(%x) = %q, %v, want ErrCiphertext", ct, got, err)
		}
	}
}

func TestParseCiphertextRefuses(t *testing.T) {
	ct := tinkCT(7, "sealed")
	enc := base64.StdEncoding.EncodeToString(ct)
	for _, tc := range []struct {
		in, want string
	}{
		{"", "want the form"},
		{enc, "want the form"},
		{"vault:" + enc, "want the form"},
		{"vault:v7" + enc, "want the form"},
		{"vault:v:" + enc, "not a decimal key version"},
		{"vault:v07:" + enc, "not a decimal key version"},
		{"vault:v+7:" + enc, "not a decimal key version"},
		{"vault:v-7:" + enc, "not a decimal key version"},
		{"vault:v7 :" + enc, "not a decimal key version"},
		{"vault:v4294967296:" + enc, "out of range"},
		{"vault:v99999999999:" + enc, "not a decimal key version"},
		{"vault:v8:" + enc, "version v8 is not the ciphertext's key version 7"},
		{"vault:v7:", "not standard base64"},
		{"vault:v7:" + strings.TrimRight(enc, "="), "not standard base64"},
		{"vault:v7:" + base64.URLEncoding.EncodeToString(tinkCT(7, "\xff\xfe\xfd")), "not standard base64"},
		{"vault:v7:" + enc[:8] + "\n" + enc[8:], "not standard base64"},
		{"vault:v7:" + enc + ":extra", "not standard base64"},
		{"vault:v7:" + base64.StdEncoding.EncodeToString([]byte{0x01, 0, 0}), "no Tink key ID prefix"},
		{"vault:v7:" + base64.StdEncoding.EncodeToString([]byte{0x00, 0, 0, 0, 7, 1}), "no Tink key ID prefix"},
		{"VAULT:v7:" + enc, "want the form"},
	} {
		got, v, err := transit.ParseCiphertext(tc.in)
		if !errors.Is(err, transit.ErrCiphertext) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseCiphertext(%q) = %x, %d, %v, want an ErrCiphertext saying %q", tc.in, got, v, err, tc.want)
		}
	}
}

// FuzzParseCiphertext: whatever ParseCiphertext accepts formats back to the
// same string (the form is canonical) and names its prefix's key ID; and
// every Tink-prefixed byte string round-trips through both.
func FuzzParseCiphertext(f *testing.F) {
	for _, s := range []string{"vault:v1:AQAAAAF4", "vault:v0:AQAAAAA=", "vault:v4294967295:Af////8=", "vault:v12:", "vault:v1:AQAAAAF4\n", "vault:v01:AQAAAAF4"} {
		f.Add(s, []byte{0x01, 0, 0, 0, 1, 'x'})
	}
	f.Fuzz(func(t *testing.T, s string, raw []byte) {
		ct, v, err := transit.ParseCiphertext(s)
		if err == nil {
			id, ok := keystore.KeyIDOf(ct)
			if !ok || id != v {
				t.Fatalf("ParseCiphertext(%q) = %x, %d: its prefix names %d (%v)", s, ct, v, id, ok)
			}
			back, err := transit.FormatCiphertext(ct)
			if err != nil || back != s {
				t.Fatalf("FormatCiphertext(ParseCiphertext(%q)) = %q, %v, want the input", s, back, err)
			}
		} else if !errors.Is(err, transit.ErrCiphertext) {
			t.Fatalf("ParseCiphertext(%q) = %v, want an ErrCiphertext", s, err)
		}
		out, err := transit.FormatCiphertext(raw)
		if _, ok := keystore.KeyIDOf(raw); !ok {
			if err == nil {
				t.Fatalf("FormatCiphertext(%x) = %q, want an error (no Tink prefix)", raw, out)
			}
			return
		}
		back, v, err := transit.ParseCiphertext(out)
		if id, _ := keystore.KeyIDOf(raw); err != nil || !bytes.Equal(back, raw) || v != id {
			t.Fatalf("ParseCiphertext(FormatCiphertext(%x)) = %x, %d, %v, want the input and %d", raw, back, v, err, id)
		}
		if want := fmt.Sprintf("vault:v%d:", v); !strings.HasPrefix(out, want) {
			t.Fatalf("FormatCiphertext(%x) = %q, want the prefix %q", raw, out, want)
		}
	})
}
