package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/atomicfile"
	backupv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/backup/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/backup"
)

// backupCommands are the verbs of "regionctl backup".
var backupCommands = map[string]command{"export": backupExport, "restore": backupRestore, "inspect": backupInspect}

// backupIdentityHint is added to a PermissionDenied answer: regionctl's own
// identity may not export or restore.
const backupIdentityHint = "backup export needs an operator or security officer identity (by default operator/*/* or officer/*/*, " +
	"e.g. --name operator/global/operator), backup restore a security officer's (e.g. --name officer/global/officer-1)"

func backupDenied(err error) error {
	if status.Code(err) == codes.PermissionDenied {
		return fmt.Errorf("%w\n  %s", err, backupIdentityHint)
	}
	return refused(err)
}

func backupExport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := regionFlags("backup export", stderr, withJSON)
	var out string
	fs.StringVar(&out, "out", "", "file to write the backup to (required; created with mode 0600, never overwritten)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if out == "" {
		return usageError(fs, "--out is required")
	}
	if _, err := os.Lstat(out); err == nil {
		return fmt.Errorf("%s exists; backups are never overwritten: choose another --out", out)
	}
	if err := o.load(); err != nil {
		return err
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	resp, err := rootCall(ctx, r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.ExportBackupResponse, error) {
		return c.ExportBackup(ctx, &rootkmsv1.ExportBackupRequest{})
	})
	if err != nil {
		return backupDenied(err)
	}
	// Check what arrived before it is kept: a file that does not parse, or
	// does not say what the answer says, is no backup.
	f, err := backup.Inspect(resp.GetBackup())
	if err != nil {
		return fmt.Errorf("the root KMS answered with a backup that does not parse: %w (nothing written)", err)
	}
	if f.Contents.GetIndex() != resp.GetIndex() || f.Contents.GetGenesisId() != resp.GetGenesisId() {
		return fmt.Errorf("the backup says index %d of genesis %s, the answer index %d of genesis %s (nothing written)",
			f.Contents.GetIndex(), f.Contents.GetGenesisId(), resp.GetIndex(), resp.GetGenesisId())
	}
	if err := atomicfile.Create(out, resp.GetBackup(), 0o600); err != nil {
		if errors.Is(err, atomicfile.ErrExists) {
			return fmt.Errorf("%s exists; backups are never overwritten: choose another --out", out)
		}
		return err
	}
	if o.json {
		resp.Backup = nil
		return printJSON(stdout, resp)
	}
	fmt.Fprintf(stdout, "backup written to %s (%d bytes, mode 0600)\n", out, len(resp.GetBackup()))
	fmt.Fprintf(stdout, "  genesis %s, Raft index %d, term %d, read by leader %s at %s for %s\n", resp.GetGenesisId(), resp.GetIndex(), resp.GetTerm(),
		f.Contents.GetReplicaId(), ts(f.Contents.GetCreatedAt()), f.Contents.GetCreatedBy())
	fmt.Fprintf(stdout, "  %d regions, %d keysets, %d rollouts\n", resp.GetRegions(), resp.GetKeysets(), resp.GetRollouts())
	fmt.Fprintf(stdout, "it holds wrapped keys and encrypted keysets only, but the record's metadata in the clear: store it like the replicas' disks.\n")
	fmt.Fprintf(stdout, "restore it into a cluster of the same root key with: regionctl backup restore --in %s --reason TEXT (a security officer)\n", out)
	return nil
}

// readBackup reads a backup file (bounded) and parses it without checking
// its tag: only the root KMS can check it.
func readBackup(path string) ([]byte, *backup.File, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer fh.Close()
	b, err := io.ReadAll(io.LimitReader(fh, backup.MaxSize+1))
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", path, err)
	}
	f, err := backup.Inspect(b)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, f, nil
}

// counts summarizes a backup's state (unverified).
func counts(c *backupv1.BackupContents) (regions, keysets, rollouts int, err error) {
	snap, err := backup.Snapshot(c)
	if err != nil {
		return 0, 0, 0, err
	}
	return len(snap.GetRegions()), len(snap.GetKeysets()), len(snap.GetRollouts()), nil
}

func backupRestore(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, o := regionFlags("backup restore", stderr, withJSON)
	var in, reason string
	var overwrite bool
	fs.StringVar(&in, "in", "", "backup file written by backup export (required)")
	fs.StringVar(&reason, "reason", "", "why (required; audited by the root KMS)")
	fs.BoolVar(&overwrite, "overwrite", false, "replace a cluster that holds regions or keysets (everything recorded since the backup is lost)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if in == "" || reason == "" {
		return usageError(fs, "--in and --reason are required")
	}
	b, f, err := readBackup(in)
	if err != nil {
		return err
	}
	if err := o.load(); err != nil {
		return err
	}
	r, err := o.root()
	if err != nil {
		return err
	}
	defer r.Close()
	resp, err := rootCall(ctx, r, func(ctx context.Context, c rootkmsv1.RootKMSClient) (*rootkmsv1.RestoreBackupResponse, error) {
		return c.RestoreBackup(ctx, &rootkmsv1.RestoreBackupRequest{Backup: b, Reason: reason, Overwrite: overwrite})
	})
	if err != nil {
		return backupDenied(err)
	}
	if o.json {
		return printJSON(stdout, resp)
	}
	fmt.Fprintf(stdout, "restored %s (genesis %s, Raft index %d, term %d, exported %s by %s)\n", in, f.Contents.GetGenesisId(),
		resp.GetBackupIndex(), resp.GetBackupTerm(), ts(f.Contents.GetCreatedAt()), f.Contents.GetCreatedBy())
	fmt.Fprintf(stdout, "  the cluster is now at Raft index %d, term %d: %d regions, %d keysets, %d rollouts\n",
		resp.GetIndex(), resp.GetTerm(), resp.GetRegions(), resp.GetKeysets(), resp.GetRollouts())
	if resp.GetReplacedRegions() > 0 || resp.GetReplacedKeysets() > 0 {
		fmt.Fprintf(stdout, "  replaced: %d regions, %d keysets the cluster held before\n", resp.GetReplacedRegions(), resp.GetReplacedKeysets())
	}
	fmt.Fprintf(stdout, "next: regionctl region list and keyset list to check the record; KMS servers pointed at this cluster unwrap their region keys from it, and bundles build from it as before.\n")
	return nil
}

func backupInspect(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("backup inspect", stderr)
	var in string
	var asJSON bool
	fs.StringVar(&in, "in", "", "backup file (required)")
	fs.BoolVar(&asJSON, "json", false, "print JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if in == "" {
		return usageError(fs, "--in is required")
	}
	_, f, err := readBackup(in)
	if err != nil {
		return err
	}
	c := f.Contents
	regions, keysets, rollouts, err := counts(c)
	if err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	if asJSON {
		summary := &rootkmsv1.ExportBackupResponse{Index: c.GetIndex(), Term: c.GetTerm(), GenesisId: c.GetGenesisId(),
			Regions: uint32(regions), Keysets: uint32(keysets), Rollouts: uint32(rollouts)}
		return printJSON(stdout, summary)
	}
	fmt.Fprintf(stdout, "%s: root KMS backup, format %d (UNVERIFIED: only a root KMS holding the root key can check its tag; restore does)\n", in, backup.FormatVersion)
	fmt.Fprintf(stdout, "  genesis %s, RMK KCV %x\n", c.GetGenesisId(), c.GetRmkKcv())
	fmt.Fprintf(stdout, "  Raft index %d, term %d, read by leader %s at %s for %s\n", c.GetIndex(), c.GetTerm(), c.GetReplicaId(), ts(c.GetCreatedAt()), c.GetCreatedBy())
	fmt.Fprintf(stdout, "  %d regions, %d keysets, %d rollouts\n", regions, keysets, rollouts)
	if age := clockNow(ctx).Sub(c.GetCreatedAt().AsTime()); age > 0 {
		fmt.Fprintf(stdout, "  age %s\n", age.Round(time.Second))
	}
	return nil
}
