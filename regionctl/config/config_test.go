package config_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/regionctl/config"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var td = identitytest.TrustDomain

const validFile = `{"team":"payments","keysets":[{"name":"payments/ledger","regions":["us-east","eu-west"],"purpose":"envelope","template":"AES256_GCM","rotation_period":"2160h","ciphertext_ttl":"8760h","acl":{"encrypt":["client/us-east/*"],"decrypt":["client/*/ledger"],"generate_data_key":[],"rewrap":[]}}]}`

func TestParseValid(t *testing.T) {
	tests := []struct {
		name string
		data string
		want *config.Team
	}{
		{"the documented example", validFile, &config.Team{Name: "payments", Keysets: []config.Keyset{{
			Name: "payments/ledger", Team: "payments", Regions: []string{"us-east", "eu-west"}, Purpose: "envelope", Template: "AES256_GCM",
			RotationPeriod: 2160 * time.Hour, CiphertextTTL: 8760 * time.Hour,
			ACL: config.ACL{Encrypt: []string{"client/us-east/*"}, Decrypt: []string{"client/*/ledger"}, GenerateDataKey: []string{}, Rewrap: []string{}},
		}}}},
		{"default template, no acl, nested names, full-URI pattern", `{"team":"search","keysets":[
			{"name":"search/index/v2","regions":["us-east"],"purpose":"envelope","rotation_period":"720h","ciphertext_ttl":"1h30m"},
			{"name":"search/logs","regions":["eu-west"],"purpose":"envelope","rotation_period":"1h","ciphertext_ttl":"1h",
			 "acl":{"decrypt":["spiffe://other.test/client/eu-west/*"]}}]}`,
			&config.Team{Name: "search", Keysets: []config.Keyset{
				{Name: "search/index/v2", Team: "search", Regions: []string{"us-east"}, Purpose: "envelope", RotationPeriod: 720 * time.Hour, CiphertextTTL: 90 * time.Minute},
				{Name: "search/logs", Team: "search", Regions: []string{"eu-west"}, Purpose: "envelope", RotationPeriod: time.Hour, CiphertextTTL: time.Hour,
					ACL: config.ACL{Decrypt: []string{"spiffe://other.test/client/eu-west/*"}}},
			}}},
		{"whitespace around the object", "\n  " + validFile + "\n\n", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := config.Parse([]byte(tt.data), td)
			if err != nil {
				t.Fatalf("Parse(%s) = %v, want nil", tt.name, err)
			}
			if tt.want == nil {
				return
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Parse(%s) (-want +got):\n%s", tt.name, diff)
			}
		})
	}
}

// keyset returns a one-keyset team file with one field of the keyset
// replaced (or removed, with value "").
func keyset(field, value string) string {
	fields := []struct{ k, v string }{
		{"name", `"payments/ledger"`}, {"regions", `["us-east","eu-west"]`}, {"purpose", `"envelope"`},
		{"template", `"AES256_GCM"`}, {"rotation_period", `"2160h"`}, {"ciphertext_ttl", `"8760h"`},
		{"acl", `{"encrypt":["client/us-east/*"]}`},
	}
	var parts []string
	for _, f := range fields {
		v := f.v
		if f.k == field {
			if value == "" {
				continue
			}
			v = value
		}
		parts = append(parts, `"`+f.k+`":`+v)
	}
	return `{"team":"payments","keysets":[{` + strings.Join(parts, ",") + `}]}`
}

func TestParseInvalid(t *testing.T) {
	tests := []struct {
		name, data, want string
	}{
		{"empty", ``, "EOF"},
		{"not JSON", `team: payments`, "invalid character"},
		{"an array", `[]`, "cannot unmarshal array"},
		{"null", `null`, `team ""`},
		{"unknown top-level field", `{"team":"payments","owner":"x","keysets":[]}`, `unknown field "owner"`},
		{"unknown keyset field", strings.Replace(validFile, `"purpose"`, `"primary":1,"purpose"`, 1), `unknown field "primary"`},
		{"unknown acl field", keyset("acl", `{"encrypt":[],"admin":["x/y/z"]}`), `unknown field "admin"`},
		{"field in another case", strings.Replace(validFile, `"team"`, `"Team"`, 1), `field "Team"`},
		{"field with a Unicode look-alike", strings.Replace(validFile, `"keysets"`, `"\u212aeysets"`, 1), "lowercase"},
		{"duplicate top-level field", `{"team":"payments","team":"search","keysets":[]}`, `"team" appears twice`},
		{"duplicate nested field", keyset("acl", `{"encrypt":["client/a/b"],"encrypt":["client/*/*"]}`), `"encrypt" appears twice`},
		{"trailing data", validFile + `{}`, "data after the team object"},
		{"trailing garbage", validFile + `x`, "invalid character"},
		{"no team", `{"keysets":[]}`, `team ""`},
		{"team with a slash", `{"team":"pay/ments","keysets":[]}`, `team "pay/ments"`},
		{"uppercase team", `{"team":"Payments","keysets":[]}`, `team "Payments"`},
		{"no keysets", `{"team":"payments"}`, "lists no keysets"},
		{"empty keysets", `{"team":"payments","keysets":[]}`, "lists no keysets"},
		{"invalid keyset name", keyset("name", `"payments/Ledger"`), "use lowercase segments"},
		{"keyset of another team", keyset("name", `"search/ledger"`), `start with "payments/"`},
		{"keyset named like the team", keyset("name", `"payments"`), `start with "payments/"`},
		{"keyset of a team with a longer name", keyset("name", `"payments2/ledger"`), `start with "payments/"`},
		{"keyset listed twice", `{"team":"payments","keysets":[` + strings.Repeat(`{"name":"payments/a","regions":["us-east"],"purpose":"envelope","rotation_period":"1h","ciphertext_ttl":"1h"},`, 1) +
			`{"name":"payments/a","regions":["us-east"],"purpose":"envelope","rotation_period":"1h","ciphertext_ttl":"1h"}]}`, "listed twice"},
		{"no regions", keyset("regions", ""), "no regions"},
		{"empty regions", keyset("regions", `[]`), "no regions"},
		{"invalid region", keyset("regions", `["US-EAST"]`), `region "US-EAST"`},
		{"region twice", keyset("regions", `["us-east","eu-west","us-east"]`), `region "us-east" listed twice`},
		{"no purpose", keyset("purpose", ""), `purpose ""`},
		{"other purpose", keyset("purpose", `"signing"`), `purpose "signing"`},
		{"purpose in capitals", keyset("purpose", `"ENVELOPE"`), `purpose "ENVELOPE"`},
		{"unknown template", keyset("template", `"AES256_CTR_HMAC_SHA256"`), "unknown key template"},
		{"no rotation period", keyset("rotation_period", ""), "rotation_period: missing"},
		{"rotation period without unit", keyset("rotation_period", `"2160"`), "rotation_period"},
		{"rotation period in days", keyset("rotation_period", `"90d"`), "rotation_period"},
		{"zero rotation period", keyset("rotation_period", `"0s"`), "rotation_period: \"0s\": must be positive"},
		{"rotation period as a number", keyset("rotation_period", `7776000`), "cannot unmarshal number"},
		{"no TTL", keyset("ciphertext_ttl", ""), "ciphertext_ttl: missing"},
		{"zero TTL", keyset("ciphertext_ttl", `"0"`), "ciphertext_ttl: \"0\": must be positive"},
		{"negative TTL", keyset("ciphertext_ttl", `"-1h"`), "must be positive"},
		{"bad encrypt pattern", keyset("acl", `{"encrypt":["client/us-east"]}`), "acl.encrypt"},
		{"bad decrypt pattern", keyset("acl", `{"decrypt":["client/*/led*"]}`), "acl.decrypt"},
		{"bad generate_data_key pattern", keyset("acl", `{"generate_data_key":["spiffe://*/client/a/b"]}`), "acl.generate_data_key"},
		{"bad rewrap pattern", keyset("acl", `{"rewrap":[""]}`), "acl.rewrap"},
		{"acl as a list", keyset("acl", `["client/*/*"]`), "cannot unmarshal array"},
		{"too large", `{"team":"payments","keysets":[` + strings.Repeat(" ", config.MaxFileSize) + `]}`, "more than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := config.Parse([]byte(tt.data), td)
			if !errors.Is(err, config.ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Parse(%s) = %v, %v; want ErrInvalid containing %q", tt.name, got, err, tt.want)
			}
		})
	}
}

func TestParseNeedsTrustDomain(t *testing.T) {
	if got, err := config.Parse([]byte(validFile), spiffeid.TrustDomain{}); err == nil {
		t.Errorf("Parse(zero trust domain) = %v, nil; want an error", got)
	}
}

func writeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, data := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func team(name string, keysets ...string) string {
	var ks []string
	for _, k := range keysets {
		ks = append(ks, `{"name":"`+k+`","regions":["us-east"],"purpose":"envelope","rotation_period":"1h","ciphertext_ttl":"24h"}`)
	}
	return `{"team":"` + name + `","keysets":[` + strings.Join(ks, ",") + `]}`
}

func TestLoadDir(t *testing.T) {
	tests := []struct {
		name      string
		files     map[string]string
		wantTeams []string          // good teams, in file-name order
		wantBad   map[string]string // file name -> error substring
	}{
		{"all good", map[string]string{"payments.json": validFile, "search.json": team("search", "search/index")},
			[]string{"payments", "search"}, nil},
		{"one bad file does not affect the others", map[string]string{
			"a.json": team("alpha", "alpha/one"), "b.json": `{"team":"beta","keysets":[{"name":"beta/x"}]}`, "c.json": team("gamma", "gamma/one")},
			[]string{"alpha", "gamma"}, map[string]string{"b.json": "no regions"}},
		{"truncated file", map[string]string{"a.json": team("alpha", "alpha/one"), "b.json": validFile[:len(validFile)/2]},
			[]string{"alpha"}, map[string]string{"b.json": "unexpected EOF"}},
		{"team in two files: both bad", map[string]string{
			"a.json": team("alpha", "alpha/one"), "a2.json": team("alpha", "alpha/two"), "c.json": team("gamma", "gamma/one")},
			[]string{"gamma"}, map[string]string{"a.json": `team "alpha" is also defined in`, "a2.json": `team "alpha" is also defined in`}},
		{"keyset in two files: both bad", map[string]string{
			"a.json": team("alpha", "alpha/one", "alpha/two"), "a2.json": team("alpha", "alpha/two"), "c.json": team("gamma", "gamma/one")},
			[]string{"gamma"}, map[string]string{"a.json": `keyset "alpha/two" is also defined in`, "a2.json": `keyset "alpha/two" is also defined in`}},
		{"only *.json files, not hidden ones, not subdirectories", map[string]string{
			"a.json": team("alpha", "alpha/one"), "README.md": "not a config", ".b.json": "garbage", "sub/c.json": "garbage", "d.json.bak": "garbage"},
			[]string{"alpha"}, nil},
		{"empty directory", map[string]string{}, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := writeFiles(t, tt.files)
			good, bad, err := config.LoadDir(dir, td)
			if err != nil {
				t.Fatalf("LoadDir() = %v", err)
			}
			var gotTeams []string
			for _, g := range good {
				gotTeams = append(gotTeams, g.Name)
				if filepath.Dir(g.File) != dir {
					t.Errorf("LoadDir(): team %s File = %q, want a file in %s", g.Name, g.File, dir)
				}
			}
			if diff := cmp.Diff(tt.wantTeams, gotTeams); diff != "" {
				t.Errorf("LoadDir() good teams (-want +got):\n%s", diff)
			}
			gotBad := map[string]string{}
			for _, b := range bad {
				gotBad[filepath.Base(b.File)] = b.Error()
				if !errors.Is(b, config.ErrInvalid) {
					t.Errorf("LoadDir() error for %s = %v, want ErrInvalid", b.File, b.Err)
				}
			}
			if len(gotBad) != len(tt.wantBad) {
				t.Errorf("LoadDir() bad files = %v, want %d: %v", gotBad, len(tt.wantBad), tt.wantBad)
			}
			for f, want := range tt.wantBad {
				if !strings.Contains(gotBad[f], want) {
					t.Errorf("LoadDir() error for %s = %q, want it to contain %q", f, gotBad[f], want)
				}
			}
		})
	}
	if _, _, err := config.LoadDir(filepath.Join(t.TempDir(), "missing"), td); err == nil {
		t.Errorf("LoadDir(missing dir) = nil error, want an error")
	}
}

func TestLoadFileUnreadable(t *testing.T) {
	dir := writeFiles(t, map[string]string{"a.json": validFile})
	if _, err := config.LoadFile(filepath.Join(dir, "nope.json"), td); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("LoadFile(missing) = %v, want ErrNotExist", err)
	}
	got, err := config.LoadFile(filepath.Join(dir, "a.json"), td)
	if err != nil || got.File != filepath.Join(dir, "a.json") {
		t.Errorf("LoadFile(a.json) = %+v, %v; want File set, nil", got, err)
	}
}

// FuzzParse: Parse never panics, and whatever it accepts is a team whose
// keysets all carry its name as their prefix and have positive durations.
func FuzzParse(f *testing.F) {
	f.Add([]byte(validFile))
	f.Add([]byte(team("search", "search/index", "search/logs")))
	f.Add([]byte(`{"team":"a","team":"b"}`))
	f.Add([]byte(`{"team":"a","keysets":[{"name":"a/b","acl":{"encrypt":[{"x":1}]}}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := config.Parse(data, td)
		if err != nil {
			if !errors.Is(err, config.ErrInvalid) {
				t.Fatalf("Parse() = %v, want ErrInvalid", err)
			}
			return
		}
		if len(got.Keysets) == 0 {
			t.Fatalf("Parse() accepted a team with no keysets")
		}
		for _, k := range got.Keysets {
			if !strings.HasPrefix(k.Name, got.Name+"/") || k.RotationPeriod <= 0 || k.CiphertextTTL <= 0 || len(k.Regions) == 0 {
				t.Fatalf("Parse() accepted keyset %+v of team %q", k, got.Name)
			}
		}
	})
}
