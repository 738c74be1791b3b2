package tests

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/tests/framework"
)

// TestEveryBinaryHelp runs every built binary, and every command of the
// operators' tools, with -h (or --help): each exits 0 and its help starts
// with one line that says what it is.
func TestEveryBinaryHelp(t *testing.T) {
	logs := filepath.Join(t.TempDir(), "logs")
	tests := []struct {
		bin       string
		args      []string
		firstLine string // prefix
	}{
		{bin.Cairn, []string{"-h"}, "cairn: the Cairn command-line tool for people: "},
		{bin.Cairn, []string{"dev", "certs", "-h"}, "cairn dev certs: "},
		{bin.Cairn, []string{"up", "-h"}, "cairn up: start the whole Cairn chain"},
		{bin.Cairn, []string{"up", "restart", "-h"}, "cairn up restart: restart one component"},
		{bin.Cairn, []string{"kms", "--help"}, "cairn kms: "},
		{bin.Cairn, []string{"kms", "status", "-h"}, "cairn kms status: "},
		{bin.Safe, []string{"-h"}, "safe: the security officers' tool: "},
		{bin.Safe, []string{"ceremony", "-h"}, "safe ceremony: open, show or cancel an unseal ceremony"},
		{bin.Safe, []string{"ceremony", "open", "-h"}, "safe ceremony open: "},
		{bin.Safe, []string{"ceremony", "status", "-h"}, "safe ceremony status: "},
		{bin.Safe, []string{"ceremony", "cancel", "-h"}, "safe ceremony cancel: "},
		{bin.Safe, []string{"genesis", "-h"}, "safe genesis: "},
		{bin.Safe, []string{"release", "-h"}, "safe release: "},
		{bin.Safe, []string{"rekey", "-h"}, "safe rekey: "},
		{bin.Safe, []string{"drill", "-h"}, "safe drill: "},
		{bin.Safe, []string{"list", "-h"}, "safe list: "},
		{bin.RegionctlBinary(), []string{"-h"}, "regionctl: the SREs' tool for Cairn's regional config"},
		{bin.RegionctlBinary(), []string{"keyset", "rotate", "-h"}, "regionctl keyset rotate: "},
		{bin.RegionctlBinary(), []string{"rollout", "start", "-h"}, "regionctl rollout start: "},
		{bin.RegionctlBinary(), []string{"status", "--help"}, "regionctl status: "},
		{bin.Distributor, []string{"-h"}, "distributor: a Cairn root-key distributor: "},
		{bin.RootKMS, []string{"--help"}, "rootkms: a Cairn root KMS replica: "},
		{bin.KMSBinary(), []string{"-h"}, "kms: a Cairn regional KMS server: "},
		{bin.Blobstore, []string{"-h"}, "blobstore: a small storage system that keeps files envelope-encrypted"},
	}
	for i, tt := range tests {
		name := filepath.Base(tt.bin) + " " + strings.Join(tt.args, " ")
		t.Run(name, func(t *testing.T) {
			r := framework.Run(t, fmt.Sprintf("help-%02d", i), logs, tt.bin, tt.args)
			// The help goes to stdout, or, for the servers and regionctl's
			// commands (flag's default), to stderr.
			out := r.Stdout
			if out == "" {
				out = r.Stderr
			}
			first, rest, _ := strings.Cut(out, "\n")
			if r.ExitCode != 0 || !strings.HasPrefix(first, tt.firstLine) || !strings.Contains(rest, "-") {
				t.Errorf("%s = exit %d, first line %q; want exit 0 and a first line starting %q, then the usage\n%s", name, r.ExitCode, first, tt.firstLine, r)
			}
		})
	}
}
