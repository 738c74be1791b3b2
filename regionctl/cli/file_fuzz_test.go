package cli

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	"github.com/cairnkms/cairn/regionctl/rollout"
)

// FuzzParseFile feeds arbitrary config files to ParseFile and LoadFile. What
// ParseFile accepts parses again unchanged once marshalled back to JSON, and
// LoadFile agrees with it; what it refuses, LoadFile refuses naming the file.
func FuzzParseFile(f *testing.F) {
	for _, s := range []string{
		`{"trust_domain": "cairn.local", "identity": {"dev_certs": "certs", "name": "regionctl/global/regionctl"}, "rootkms": ["127.0.0.1:7111"],
		  "regions": {"us-east": ["127.0.0.1:7131"]}, "signing_key": "k", "signing_pub": "k.pub", "teams": "teams", "propagation_window": "10m",
		  "message_budget": {"limit": 1000, "rotate_at": 0.5}, "quotas": {"default": {"pattern": "*", "requests_per_second": 10, "burst": 20, "max_concurrent": 4},
		  "callers": [{"pattern": "client/us-east/*", "requests_per_second": 1}]}}`,
		`{"identity": {"cert": "c.pem", "key": "k.pem", "ca": "ca.pem"}, "signing_pubs": ["a.pub", "b.pub"]}`,
		`{}`, `{"teams": "a", "Teams": "b"}`, `{"teams": "a", "teams": "b"}`, `{"regions": {"US": ["x"]}}`, `{"regions": {"us-east": []}}`,
		`{"propagation_window": "-1s"}`, `{"message_budget": {"rotate_at": 2}}`, `{"identity": {"dev_certs": "d", "cert": "c"}}`,
		`{"quotas": {"default": null, "callers": [{"pattern": "a", "x": 1}]}}`, `{} {}`, `{"teams": 1}`, `[]`, ``, `null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "regionctl.json")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		loaded, loadErr := LoadFile(path)
		file, err := ParseFile(data)
		if err != nil {
			if file != nil {
				t.Fatalf("ParseFile(%q) = %+v, %v, want no file with the error", data, file, err)
			}
			if loadErr == nil || !strings.Contains(loadErr.Error(), path) {
				t.Fatalf("LoadFile(%q) = %v, want an error naming the file (ParseFile: %v)", data, loadErr, err)
			}
			return
		}
		if loadErr != nil {
			t.Fatalf("LoadFile(%q) = %v, but ParseFile accepted it", data, loadErr)
		}
		for _, p := range []string{loaded.Identity.DevCerts, loaded.Identity.Cert, loaded.Identity.Key, loaded.Identity.CA, loaded.SigningKey, loaded.SigningPub, loaded.Teams} {
			if p != "" && !filepath.IsAbs(p) {
				t.Fatalf("LoadFile(%q) left path %q relative", data, p)
			}
		}
		b, err := json.Marshal(file)
		if err != nil {
			t.Fatalf("json.Marshal(accepted %q) = %v", data, err)
		}
		// ParseFile refuses a top-level null (see the report), which
		// json.Marshal writes for a nil pointer or slice: leave those out.
		var top map[string]json.RawMessage
		if err := json.Unmarshal(b, &top); err != nil {
			t.Fatal(err)
		}
		for k, v := range top {
			if string(v) == "null" {
				delete(top, k)
			}
		}
		if b, err = json.Marshal(top); err != nil {
			t.Fatal(err)
		}
		again, err := ParseFile(b)
		if err != nil {
			t.Fatalf("ParseFile(%s) = %v, want the file ParseFile(%q) accepted", b, err, data)
		}
		if diff := cmp.Diff(file, again, cmp.AllowUnexported(File{}), cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("ParseFile after marshalling mismatch (-first +second):\n%s", diff)
		}
	})
}

// fuzzRolloutRecords are stored records of a rollout at a few points of
// its life, encoded by encodeRollout.
func fuzzRolloutRecords(tb testing.TB) []*statev1.RolloutRecord {
	tb.Helper()
	sha := strings.Repeat("ab", 32)
	change := rollout.Change{By: "spiffe://cairn.test/regionctl/global/alice", Why: "rotate",
		Bundles: []rollout.BundleRef{{Region: "us-east", Serial: 2, SHA256: sha}, {Region: "eu-west", Serial: 3, SHA256: sha}}}
	plan, err := rollout.NewPlan(change, map[string][]string{"us-east": {"u1", "u2", "u3"}, "eu-west": {"e1"}},
		rollout.Options{Regions: []string{"us-east", "eu-west"}})
	if err != nil {
		tb.Fatal(err)
	}
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	rec := rollout.NewRecord("r-1", plan, "ctl-1", 1, now)
	var out []*statev1.RolloutRecord
	add := func(r rollout.Record) {
		p, err := encodeRollout(r)
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, p)
	}
	add(rec)
	for _, ev := range []rollout.Event{
		rollout.Started{Epoch: 1},
		rollout.DryRunResult{Epoch: 1, Server: "u1", OK: true, Serving: rollout.BundleRef{Region: "us-east", Serial: 1, SHA256: strings.Repeat("cd", 32)}},
		rollout.Measured{Epoch: 1, Stage: 0},
		rollout.Applied{Epoch: 1, Server: "u1", Serial: 2, Previous: rollout.BundleRef{Region: "us-east", Serial: 1, SHA256: strings.Repeat("cd", 32)}},
	} {
		next, _, err := rollout.Next(rec, ev, now)
		if err != nil {
			tb.Fatalf("rollout.Next(%T) = %v", ev, err)
		}
		rec = next
		add(rec)
	}
	return out
}

// FuzzDecodeRollout feeds arbitrary cairn.rollout.v1+json bodies, ids and
// epochs to decodeRollout. What it accepts is consistent (rollout.Check)
// and matches its record, and decodes again unchanged after encodeRollout.
func FuzzDecodeRollout(f *testing.F) {
	for _, p := range fuzzRolloutRecords(f) {
		f.Add(p.GetBody(), p.GetId(), p.GetEpoch())
		f.Add(p.GetBody(), p.GetId(), p.GetEpoch()+1)
		f.Add(p.GetBody()[:len(p.GetBody())/2], p.GetId(), p.GetEpoch())
	}
	f.Add([]byte(`{}`), "", uint64(0))
	f.Add([]byte(`{"id": "r-1", "epoch": 1}`), "r-1", uint64(1))
	f.Add([]byte(`null`), "", uint64(0))
	f.Add([]byte(``), "r", uint64(1))
	f.Fuzz(func(t *testing.T, body []byte, id string, epoch uint64) {
		p := &statev1.RolloutRecord{Id: id, Epoch: epoch, BodyFormat: rolloutBodyFormat, Body: body}
		rec, err := decodeRollout(p)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "rollout ") {
				t.Fatalf("decodeRollout(%q) error = %q, want it to name the rollout", body, err)
			}
			return
		}
		if rec.ID != id || rec.Epoch != epoch {
			t.Fatalf("decodeRollout(id %q, epoch %d) = a record of id %q, epoch %d", id, epoch, rec.ID, rec.Epoch)
		}
		if err := rollout.Check(rec); err != nil {
			t.Fatalf("decodeRollout(%q) accepted an inconsistent record: %v", body, err)
		}
		enc, err := encodeRollout(rec)
		if err != nil {
			t.Fatalf("encodeRollout(accepted %q) = %v", body, err)
		}
		if enc.GetId() != id || enc.GetEpoch() != epoch {
			t.Fatalf("encodeRollout(accepted %q) = id %q, epoch %d, want %q, %d", body, enc.GetId(), enc.GetEpoch(), id, epoch)
		}
		again, err := decodeRollout(enc)
		if err != nil {
			t.Fatalf("decodeRollout(encodeRollout(accepted %q)) = %v", body, err)
		}
		if diff := cmp.Diff(rec, again, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("decodeRollout after encodeRollout mismatch (-first +second):\n%s", diff)
		}
		other := &statev1.RolloutRecord{Id: id, Epoch: epoch, BodyFormat: "cairn.rollout.v2+json", Body: body}
		if _, err := decodeRollout(other); err == nil {
			t.Fatalf("decodeRollout(body format v2) = nil error, want it refused")
		}
	})
}
