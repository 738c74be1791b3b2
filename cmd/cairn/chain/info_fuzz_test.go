package chain

import (
	"bufio"
	"bytes"
	"encoding/json"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// FuzzLoad feeds arbitrary chain.json contents to Load. What it accepts
// validates and loads again unchanged once written back with writeJSONFile
// (to a test directory, never to the StateDir the input names); what it
// refuses is a chain: error and no Info.
func FuzzLoad(f *testing.F) {
	info := Info{Version: InfoVersion, StateDir: "/s", TrustDomain: "cairn.local", BasePort: 7100, Safes: SafesFile, LauncherPID: 42,
		StartedAt: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), CA: "/c/ca.pem", Control: "/s/run/launcher.sock",
		Components: []Component{{Name: "us-east/kms-1", Kind: "kms", Region: "us-east", Address: "127.0.0.1:7131", PID: 9, Log: "/l", StateDir: "/k"}},
		Regions: []Region{{Name: "us-east", KMS: []string{"127.0.0.1:7131"}, Keysets: []string{KeyURI("us-east", notesKeyset)},
			Client: Identity{SPIFFEID: "spiffe://cairn.local/client/us-east/demo", Cert: "/cert", Key: "/key", CA: "/c/ca.pem"}}},
		Regionctl: Regionctl{IdentityFlags: []string{"--name", "regionctl/global/regionctl"}, RootKMS: []string{"127.0.0.1:7111"}}}
	b, err := json.Marshal(info)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add(b[:len(b)/2])
	for _, s := range []string{`{"version": 1, "trust_domain": "t", "ca": "c", "regions": [{"name": "r", "kms": ["a"]}]}`,
		`{"version": 2, "trust_domain": "t", "ca": "c", "regions": [{"name": "r", "kms": ["a"]}]}`,
		`{"version": 1, "trust_domain": "t", "ca": "c", "regions": [{"name": "r"}]}`,
		`{"version": 1, "trust_domain": "t", "ca": "c", "regions": [null]}`, `{"version": 1, "future": true}`,
		`{"version": 1, "started_at": "yesterday"}`, `null`, `[]`, ``} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, InfoFile), data, 0o644); err != nil {
			t.Fatal(err)
		}
		got, err := Load(dir)
		if err != nil {
			if got != nil {
				t.Fatalf("Load(%q) = %+v, %v, want no Info with the error", data, got, err)
			}
			if !strings.HasPrefix(err.Error(), "chain: ") {
				t.Fatalf("Load(%q) error = %q, want the chain: prefix", data, err)
			}
			return
		}
		if err := got.Validate(); err != nil {
			t.Fatalf("Load(%q) accepted an Info that does not validate: %v", data, err)
		}
		again := t.TempDir()
		if err := writeJSONFile(filepath.Join(again, InfoFile), got, 0o644); err != nil {
			t.Fatal(err)
		}
		reloaded, err := Load(again)
		if err != nil {
			t.Fatalf("Load(rewritten) = %v, want the Info Load(%q) accepted", err, data)
		}
		if diff := cmp.Diff(got, reloaded, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("Load after rewriting mismatch (-first +second):\n%s", diff)
		}
	})
}

// FuzzControlRequest feeds arbitrary request bytes to handleControl, the
// control socket's request decoder, on a chain with no components (so no
// request restarts anything). Every answer is JSON lines ending in exactly
// one Done line with an error: a request that is not {"restart": NAME} is
// a bad request, one that is names no component.
func FuzzControlRequest(f *testing.F) {
	for _, s := range []string{`{"restart": "us-east/kms-1"}` + "\n", `{"restart": ""}` + "\n", `{}` + "\n", `{"restart": 1}` + "\n",
		`{"restart": "svc"}`, "\n", "", strings.Repeat("a", maxControlRequest+10) + "\n", `{"restart": "a\nb"}` + "\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		c := &Chain{s: settings{StateDir: dir}, layout: layout{dir}, out: &bytes.Buffer{}, log: slog.New(slog.DiscardHandler), died: make(chan struct{}, 1)}
		server, client := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			defer server.Close()
			c.handleControl(server)
		}()
		go func() {
			client.SetWriteDeadline(time.Now().Add(controlReadTimeout))
			client.Write(data)
			// A request with no newline ends where the client stops writing.
			if cw, ok := client.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			}
		}()
		if !bytes.Contains(data[:min(len(data), maxControlRequest)], []byte("\n")) {
			// net.Pipe has no half close: without a newline the server
			// waits for its read deadline. Close the client instead and
			// just check that handleControl returns.
			client.Close()
			select {
			case <-done:
			case <-time.After(controlReadTimeout + 5*time.Second):
				t.Fatalf("handleControl(%q) did not return", data)
			}
			return
		}
		client.SetReadDeadline(time.Now().Add(controlReadTimeout + 5*time.Second))
		sc := bufio.NewScanner(client)
		var replies []controlReply
		for sc.Scan() {
			var r controlReply
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				t.Fatalf("handleControl(%q) answered %q, not a JSON reply: %v", data, sc.Bytes(), err)
			}
			replies = append(replies, r)
			if r.Done {
				break
			}
		}
		client.Close()
		<-done
		if len(replies) == 0 || !replies[len(replies)-1].Done {
			t.Fatalf("handleControl(%q) = %+v, want replies ending in a Done line", data, replies)
		}
		last := replies[len(replies)-1]
		line, _, _ := bytes.Cut(data, []byte("\n"))
		var req controlRequest
		if json.Unmarshal(append(line, '\n'), &req) != nil || req.Restart == "" {
			if !strings.HasPrefix(last.Error, "chain: bad request") {
				t.Fatalf("handleControl(%q) error = %q, want a bad request", data, last.Error)
			}
			return
		}
		if !strings.HasPrefix(last.Error, "chain: no component") {
			t.Fatalf("handleControl(%q) error = %q, want no component (the chain has none)", data, last.Error)
		}
	})
}
