package devca_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func TestIssue(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	ca := newCA(t, td)
	for _, id := range []spiffeid.ID{
		mustID(t, td, "distributor", "global", "distributor-1"),
		mustID(t, td, "kms", "eu-west", "kms-2"),
		mustID(t, td, "client", "us-east", "demo"),
		mustID(t, td, "a", "path", "of", "four"),
	} {
		t.Run(id.String(), func(t *testing.T) {
			before := time.Now().Truncate(time.Second)
			leaf := issue(t, ca, id, devca.LeafOptions{})
			after := time.Now()

			gotID, chains, err := x509svid.ParseAndVerify([][]byte{leaf.Cert.Raw}, bundleOf(ca))
			if err != nil {
				t.Fatalf("ParseAndVerify(Issue(%s)) error = %v", id, err)
			}
			cert := leaf.Cert
			block, rest := pem.Decode(leaf.CertPEM)
			key, keyErr := tls.X509KeyPair(leaf.CertPEM, leaf.KeyPEM)
			pub, _ := cert.PublicKey.(*ecdsa.PublicKey)
			checks := []struct {
				name      string
				got, want any
			}{
				{"ParseAndVerify ID", gotID, id},
				{"Leaf.ID", leaf.ID, id},
				{"chain length", len(chains[0]), 2},
				{"URIs", urls(cert), []string{id.String()}},
				{"IsCA", cert.IsCA, false},
				{"BasicConstraintsValid", cert.BasicConstraintsValid, true},
				{"KeyUsage", cert.KeyUsage, x509.KeyUsageDigitalSignature},
				{"ExtKeyUsage", cert.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}},
				{"DNSNames", cert.DNSNames, []string{"localhost"}},
				{"IPAddresses", ips(cert), []string{"127.0.0.1", "::1"}},
				{"curve is P-256", pub != nil && pub.Curve == elliptic.P256(), true},
				{"SubjectKeyId set", len(cert.SubjectKeyId), 20},
				{"AuthorityKeyId is CA's", bytes.Equal(cert.AuthorityKeyId, ca.Certificate().SubjectKeyId), true},
				{"NotBefore about a minute ago", !cert.NotBefore.Before(before.Add(-time.Minute)) && !cert.NotBefore.After(after.Add(-time.Minute)), true},
				{"NotAfter about a year ahead", !cert.NotAfter.Before(before.Add(365*24*time.Hour)) && !cert.NotAfter.After(after.Add(365*24*time.Hour)), true},
				{"CertPEM is one CERTIFICATE", block != nil && block.Type == "CERTIFICATE" && len(rest) == 0 && bytes.Equal(block.Bytes, cert.Raw), true},
				{"KeyPEM type", pemType(leaf.KeyPEM), "PRIVATE KEY"},
				{"X509KeyPair error", errString(keyErr), ""},
				{"key is the certificate's", key.Leaf != nil && key.Leaf.Equal(cert), true},
			}
			for _, c := range checks {
				if diff := cmp.Diff(c.want, c.got, cmpOpts); diff != "" {
					t.Errorf("Issue(%s): %s mismatch (-want +got):\n%s", id, c.name, diff)
				}
			}
		})
	}
}

func urls(cert *x509.Certificate) []string {
	var s []string
	for _, u := range cert.URIs {
		s = append(s, u.String())
	}
	return s
}

func ips(cert *x509.Certificate) []string {
	var s []string
	for _, ip := range cert.IPAddresses {
		s = append(s, ip.String())
	}
	return s
}

func pemType(b []byte) string {
	block, _ := pem.Decode(b)
	if block == nil {
		return ""
	}
	return block.Type
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func TestIssueRandomSerials(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	ca := newCA(t, td)
	id := mustID(t, td, "kms", "us-east", "kms-1")
	a, b := issue(t, ca, id, devca.LeafOptions{}), issue(t, ca, id, devca.LeafOptions{})
	if a.Cert.SerialNumber.Cmp(b.Cert.SerialNumber) == 0 {
		t.Errorf("Issue(%s) twice gave serial %x both times, want different serials", id, a.Cert.SerialNumber)
	}
	if bytes.Equal(a.KeyPEM, b.KeyPEM) {
		t.Errorf("Issue(%s) twice gave the same key, want fresh keys", id)
	}
}

func TestIssueVerifiesOnlyAgainstItsCA(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	ca, other := newCA(t, td), newCA(t, td)
	id := mustID(t, td, "rootkms", "global", "rootkms-1")
	tests := []struct {
		name    string
		issuer  *devca.CA
		wantErr bool
	}{
		{"same CA", ca, false},
		{"another CA of the same trust domain", other, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			leaf := issue(t, tt.issuer, id, devca.LeafOptions{})
			got, err := verifyPEM(t, leaf.CertPEM, bundleOf(ca))
			if (err != nil) != tt.wantErr {
				t.Errorf("ParseAndVerify(leaf of %s) = %s, %v, want error %v", tt.name, got, err, tt.wantErr)
			}
		})
	}
}

func TestIssueRefuses(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	ca := newCA(t, td)
	now := time.Now()
	good := mustID(t, td, "kms", "us-east", "kms-1")
	tests := []struct {
		name string
		id   spiffeid.ID
		opts devca.LeafOptions
	}{
		{"another trust domain", mustID(t, mustTD(t, "prod.cairn.test"), "kms", "us-east", "kms-1"), devca.LeafOptions{}},
		{"zero ID", spiffeid.ID{}, devca.LeafOptions{}},
		{"trust domain ID without path", td.ID(), devca.LeafOptions{}},
		{"NotBefore after NotAfter", good, devca.LeafOptions{NotBefore: now.Add(time.Hour), NotAfter: now}},
		{"NotBefore equals NotAfter", good, devca.LeafOptions{NotBefore: now, NotAfter: now}},
		{"NotAfter after the CA's", good, devca.LeafOptions{NotAfter: ca.Certificate().NotAfter.Add(time.Hour)}},
		{"NotBefore after the default NotAfter", good, devca.LeafOptions{NotBefore: now.Add(2 * 365 * 24 * time.Hour)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if leaf, err := ca.Issue(tt.id, tt.opts); err == nil {
				t.Errorf("Issue(%s, %+v) = %v, want error", tt.id, tt.opts, leaf)
			}
		})
	}
}

func TestIssueExpired(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	now := time.Now()
	fresh := newCA(t, td)
	old, err := devca.New(td, now.Add(-72*time.Hour))
	if err != nil {
		t.Fatalf("New(%s) error = %v", td, err)
	}
	id := mustID(t, td, "client", "us-east", "demo")
	tests := []struct {
		name string
		ca   *devca.CA
		opts devca.LeafOptions
	}{
		{"fresh CA, only NotAfter", fresh, devca.LeafOptions{NotAfter: now.Add(-time.Hour)}},
		{"fresh CA, NotAfter just past", fresh, devca.LeafOptions{NotAfter: now.Add(-30 * time.Second)}},
		{"old CA, only NotAfter", old, devca.LeafOptions{NotAfter: now.Add(-time.Hour)}},
		{"old CA, both bounds", old, devca.LeafOptions{NotBefore: now.Add(-48 * time.Hour), NotAfter: now.Add(-24 * time.Hour)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			leaf := issue(t, tt.ca, id, tt.opts)
			_, err := verifyPEM(t, leaf.CertPEM, bundleOf(tt.ca))
			var invalid x509.CertificateInvalidError
			if !errors.As(err, &invalid) || invalid.Reason != x509.Expired {
				t.Errorf("ParseAndVerify(Issue(%s, %+v)) error = %v, want x509.Expired", id, tt.opts, err)
			}
			// Inside its window (when the CA is valid too) the same leaf
			// verifies, so the failure above is expiry and nothing else.
			mid := leaf.Cert.NotBefore.Add(leaf.Cert.NotAfter.Sub(leaf.Cert.NotBefore) / 2)
			if mid.Before(tt.ca.Certificate().NotBefore) {
				return
			}
			if _, _, err := x509svid.ParseAndVerify([][]byte{leaf.Cert.Raw}, bundleOf(tt.ca), x509svid.WithTime(mid)); err != nil {
				t.Errorf("ParseAndVerify(Issue(%s, %+v), at %s) error = %v, want nil", id, tt.opts, mid, err)
			}
		})
	}
}

func TestIssueOptions(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	ca := newCA(t, td)
	id := mustID(t, td, "kms", "us-east", "kms-1")
	nb := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	na := nb.Add(48 * time.Hour)
	tests := []struct {
		name      string
		opts      devca.LeafOptions
		wantDNS   []string
		wantIPs   []string
		wantNB    time.Time
		wantNA    time.Time
		checkTime bool
	}{
		{
			name:    "defaults",
			wantDNS: []string{"localhost"},
			wantIPs: []string{"127.0.0.1", "::1"},
		},
		{
			name:    "explicit SANs",
			opts:    devca.LeafOptions{DNSNames: []string{"kms-1.us-east.cairn.test"}, IPs: []net.IP{net.ParseIP("10.0.0.7")}},
			wantDNS: []string{"kms-1.us-east.cairn.test"},
			wantIPs: []string{"10.0.0.7"},
		},
		{
			name: "empty SANs mean none",
			opts: devca.LeafOptions{DNSNames: []string{}, IPs: []net.IP{}},
		},
		{
			name:    "only DNS names set",
			opts:    devca.LeafOptions{DNSNames: []string{"a.test"}},
			wantDNS: []string{"a.test"},
			wantIPs: []string{"127.0.0.1", "::1"},
		},
		{
			name:      "explicit window",
			opts:      devca.LeafOptions{NotBefore: nb, NotAfter: na},
			wantDNS:   []string{"localhost"},
			wantIPs:   []string{"127.0.0.1", "::1"},
			wantNB:    nb,
			wantNA:    na,
			checkTime: true,
		},
		{
			name:      "past NotAfter alone backdates NotBefore by an hour",
			opts:      devca.LeafOptions{NotAfter: nb},
			wantDNS:   []string{"localhost"},
			wantIPs:   []string{"127.0.0.1", "::1"},
			wantNB:    nb.Add(-time.Hour),
			wantNA:    nb,
			checkTime: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			leaf := issue(t, ca, id, tt.opts)
			if diff := cmp.Diff(tt.wantDNS, leaf.Cert.DNSNames, cmpOpts); diff != "" {
				t.Errorf("Issue(%s, %+v).Cert.DNSNames mismatch (-want +got):\n%s", id, tt.opts, diff)
			}
			if diff := cmp.Diff(tt.wantIPs, ips(leaf.Cert), cmpOpts); diff != "" {
				t.Errorf("Issue(%s, %+v).Cert.IPAddresses mismatch (-want +got):\n%s", id, tt.opts, diff)
			}
			if !tt.checkTime {
				return
			}
			if got := leaf.Cert.NotBefore; !got.Equal(tt.wantNB) {
				t.Errorf("Issue(%s, %+v).Cert.NotBefore = %s, want %s", id, tt.opts, got, tt.wantNB)
			}
			if got := leaf.Cert.NotAfter; !got.Equal(tt.wantNA) {
				t.Errorf("Issue(%s, %+v).Cert.NotAfter = %s, want %s", id, tt.opts, got, tt.wantNA)
			}
		})
	}
}

// TestLeafMutualTLS runs real TLS 1.3 handshakes on loopback between a
// server and a client that both use Issue'd leaves, as Cairn's tiers will.
func TestLeafMutualTLS(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	ca, other := newCA(t, td), newCA(t, td)
	serverID := mustID(t, td, "kms", "us-east", "kms-1")
	clientID := mustID(t, td, "client", "us-east", "demo")
	server := issue(t, ca, serverID, devca.LeafOptions{})
	tests := []struct {
		name    string
		client  *devca.Leaf
		wantErr bool
	}{
		{"valid client", issue(t, ca, clientID, devca.LeafOptions{}), false},
		{"expired client", issue(t, ca, clientID, devca.LeafOptions{NotAfter: time.Now().Add(-time.Hour)}), true},
		{"client of another CA", issue(t, other, clientID, devca.LeafOptions{}), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			peer, err := handshake(t, ca, server, tt.client)
			var verifyErr *tls.CertificateVerificationError
			switch {
			case tt.wantErr && !errors.As(err, &verifyErr):
				t.Fatalf("handshake(%s) error = %v, want a *tls.CertificateVerificationError", tt.name, err)
			case !tt.wantErr && err != nil:
				t.Fatalf("handshake(%s) error = %v, want nil", tt.name, err)
			case !tt.wantErr && peer != clientID:
				t.Errorf("handshake(%s) peer ID = %s, want %s", tt.name, peer, clientID)
			}
		})
	}
}

// handshake runs a mutual TLS handshake on 127.0.0.1 and returns the client
// ID the server saw and the server's handshake error.
func handshake(t *testing.T, ca *devca.CA, server, client *devca.Leaf) (spiffeid.ID, error) {
	t.Helper()
	serverCert, err := server.TLSCertificate()
	if err != nil {
		t.Fatalf("TLSCertificate(%s) error = %v", server, err)
	}
	clientCert, err := client.TLSCertificate()
	if err != nil {
		t.Fatalf("TLSCertificate(%s) error = %v", client, err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Certificate())

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen error = %v", err)
	}
	defer ln.Close()
	type result struct {
		id  spiffeid.ID
		err error
	}
	done := make(chan result, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer conn.Close()
		tc := tls.Server(conn, &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{serverCert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    roots,
		})
		if err := tc.HandshakeContext(t.Context()); err != nil {
			done <- result{err: err}
			return
		}
		id, err := x509svid.IDFromCert(tc.ConnectionState().PeerCertificates[0])
		done <- result{id, err}
	}()

	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	d := tls.Dialer{Config: &tls.Config{
		MinVersion:   tls.VersionTLS13,
		RootCAs:      roots,
		ServerName:   "localhost",
		Certificates: []tls.Certificate{clientCert},
	}}
	conn, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err == nil {
		// In TLS 1.3 the client finishes before the server has checked its
		// certificate; a read collects the server's verdict.
		conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		conn.Read(make([]byte, 1))
		conn.Close()
	}
	r := <-done
	return r.id, r.err
}

func TestLeafSave(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	ca := newCA(t, td)
	leaf := issue(t, ca, mustID(t, td, "officer", "global", "officer-1"), devca.LeafOptions{})
	root := t.TempDir()
	certPath := filepath.Join(root, "a", "b", "cert.pem")
	keyPath := filepath.Join(root, "c", "key.pem")
	if err := leaf.Save(certPath, keyPath); err != nil {
		t.Fatalf("Save(%s, %s) error = %v", certPath, keyPath, err)
	}
	certFile, _ := os.ReadFile(certPath)
	keyFile, _ := os.ReadFile(keyPath)
	pair, pairErr := tls.LoadX509KeyPair(certPath, keyPath)
	block, _ := pem.Decode(keyFile)
	var pkcs8Err error = errors.New("no PEM block")
	if block != nil {
		_, pkcs8Err = x509.ParsePKCS8PrivateKey(block.Bytes)
	}
	var leftovers []string
	for _, d := range []string{filepath.Dir(certPath), filepath.Dir(keyPath)} {
		entries, _ := os.ReadDir(d)
		for _, e := range entries {
			if strings.Contains(e.Name(), ".tmp") {
				leftovers = append(leftovers, e.Name())
			}
		}
	}

	tests := []struct {
		name      string
		got, want any
	}{
		{"cert mode", mode(t, certPath), fs.FileMode(0o644)},
		{"key mode", mode(t, keyPath), fs.FileMode(0o600)},
		{"dir a mode", mode(t, filepath.Join(root, "a")), fs.FileMode(0o700)},
		{"dir a/b mode", mode(t, filepath.Join(root, "a", "b")), fs.FileMode(0o700)},
		{"dir c mode", mode(t, filepath.Join(root, "c")), fs.FileMode(0o700)},
		{"cert file content", string(certFile), string(leaf.CertPEM)},
		{"key file content", string(keyFile), string(leaf.KeyPEM)},
		{"cert file holds no private key", strings.Contains(string(certFile), "PRIVATE KEY"), false},
		{"key PEM type", pemType(keyFile), "PRIVATE KEY"},
		{"key parses as PKCS#8", errString(pkcs8Err), ""},
		{"LoadX509KeyPair error", errString(pairErr), ""},
		{"LoadX509KeyPair leaf", pair.Leaf != nil && pair.Leaf.Equal(leaf.Cert), true},
		{"temporary files left", leftovers, []string(nil)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, tt.got, cmpOpts); diff != "" {
				t.Errorf("Save(%s, %s): %s mismatch (-want +got):\n%s", certPath, keyPath, tt.name, diff)
			}
		})
	}
}

func TestLeafRedactsKey(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	leaf := issue(t, newCA(t, td), mustID(t, td, "officer", "global", "officer-1"), devca.LeafOptions{})
	block, _ := pem.Decode(leaf.KeyPEM)
	var logged bytes.Buffer
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("leaf", "leaf", leaf)
	tests := []struct {
		name string
		out  string
	}{
		{"%v", fmt.Sprintf("%v", leaf)},
		{"%+v", fmt.Sprintf("%+v", leaf)},
		{"%#v", fmt.Sprintf("%#v", leaf)},
		{"%s", fmt.Sprintf("%s", leaf)},
		{"slog", logged.String()},
	}
	secrets := []string{"PRIVATE KEY", string(leaf.KeyPEM), fmt.Sprintf("%x", block.Bytes), fmt.Sprint(block.Bytes)}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if !strings.Contains(tt.out, leaf.ID.String()) {
				t.Errorf("%s of leaf = %q, want it to name %s", tt.name, tt.out, leaf.ID)
			}
			if i := slices.IndexFunc(secrets, func(s string) bool { return strings.Contains(tt.out, s) }); i >= 0 {
				t.Errorf("%s of leaf = %q, want no key material (found secret %d)", tt.name, tt.out, i)
			}
		})
	}
}
