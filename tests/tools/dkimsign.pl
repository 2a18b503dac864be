#!/usr/bin/perl
# Sign the message on stdin with Mail::DKIM (relaxed/relaxed, rsa-sha256) as
# DOMAIN and SELECTOR with the PEM private key KEYFILE; prints the message
# with its DKIM-Signature field on top.  An implementation other than the
# one kubemta verifies with (dkimpy), so a test of a signed report proves
# interoperation, not agreement with itself.
use strict;
use warnings;
use Mail::DKIM::Signer;
use Mail::DKIM::TextWrap;

my ($domain, $selector, $keyfile) = @ARGV;
my $dkim = Mail::DKIM::Signer->new(Algorithm => "rsa-sha256", Method => "relaxed", Domain => $domain,
                                   Selector => $selector, KeyFile => $keyfile);
binmode STDIN;
binmode STDOUT;
my $message = "";
while (my $line = <STDIN>) {
    $line =~ s/\015?\012/\015\012/g;
    $message .= $line;
    $dkim->PRINT($line);
}
$dkim->CLOSE;
print $dkim->signature->as_string, "\015\012", $message;
